// HTTP calls to the broker, with the dashboard's token (kept in localStorage).

const TOKEN_KEY = 'presque.token';

/** Called with (status, error, path) for every 401 and 403 answer. */
export const hooks = { onauth: null };

export class HttpError extends Error {
  constructor(message, status, path) {
    super(message);
    this.name = 'HttpError';
    this.status = status;
    this.path = path;
  }
}

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || null;
  } catch {
    return null;
  }
}

export function saveToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    // private mode: the token lives for this page only
  }
}

/** `api('POST', '/dead/q/retry', {ids})` -> parsed JSON, or null for 204. Throws HttpError. */
export async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    throw new HttpError(`broker unreachable (${err.message})`, 0, path);
  }
  const text = res.status === 204 ? '' : await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const err = new HttpError(data?.error ?? `${res.status} ${res.statusText}`, res.status, path);
    if (res.status === 401 || res.status === 403) hooks.onauth?.(res.status, err, path);
    throw err;
  }
  return data;
}

/** Path segment for a queue name or job id. */
export const seg = encodeURIComponent;

/** fnmatch-style glob (as the broker's auth globs): `*`, `?`, `[abc]`, `[!abc]`. */
export function globMatch(glob, name) {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i];
    if (c === '*') re += '.*';
    else if (c === '?') re += '.';
    else if (c === '[' && glob.indexOf(']', i + 2) > i) {
      const end = glob.indexOf(']', i + 2);
      let set = glob.slice(i + 1, end).replace(/\\/g, '\\\\');
      if (set[0] === '!') set = '^' + set.slice(1);
      else if (set[0] === '^') set = '\\' + set;
      re += `[${set}]`;
      i = end;
    } else re += c.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
  }
  return new RegExp(`^${re}$`, 's').test(name);
}

/** Whether `roles` (GET /auth's `roles`: {role: [globs]}) grant `role` on `queue`. */
export function allows(roles, role, queue) {
  return (roles?.[role] ?? []).some((g) => globMatch(g, queue));
}
