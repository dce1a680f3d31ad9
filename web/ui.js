// Small DOM helpers shared by the dashboard's views: element builder, numbers, dialogs, notices.

/** h('button', {testid: 'x', onclick}, 'Label') -> element. `testid` sets data-testid. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v == null || v === false) continue;
    if (k === 'testid') el.dataset.testid = v;
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c != null && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** Show `value` formatted with `fmt`; the raw number stays in data-value (and the tooltip). */
export function setNum(el, value, fmt) {
  const raw = value == null ? '' : String(value);
  if (el.dataset.value === raw && el.firstChild) return;
  el.dataset.value = raw;
  el.textContent = fmt(value);
  el.title = raw;
}

export function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

/** In-page confirmation (a <dialog>, so tests can click it). Resolves true on OK. */
export function confirmDialog(message, okLabel = 'OK') {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = message;
  dialog.querySelector('[value="ok"]').textContent = okLabel;
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.showModal();
    dialog.querySelector('[value="cancel"]').focus();
  });
}

let noticeTimer = null;

/** A message under the header: kind "ok" fades after a few seconds, "error" stays until replaced. */
export function notice(text, kind = 'ok') {
  const el = document.getElementById('notice');
  clearTimeout(noticeTimer);
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = !text;
  if (text && kind === 'ok') noticeTimer = setTimeout(() => (el.hidden = true), 4000);
}

/** Run an async action from a button: disabled while it runs, errors shown as a notice. */
export async function busy(button, action) {
  button.disabled = true;
  button.setAttribute('aria-busy', 'true');
  try {
    return await action();
  } catch (err) {
    notice(err.message, 'error');
    return undefined;
  } finally {
    button.removeAttribute('aria-busy');
    button.disabled = false;
  }
}
