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
