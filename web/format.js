// Numbers and times for people: 1.2k, 1.2k/s, 3m 12s, 850 ms. Pure functions, no DOM.

const DASH = '–';

function isNum(v) {
  return typeof v === 'number' && Number.isFinite(v);
}

// 950 -> "950", 1234 -> "1.2k", 12345 -> "12k", 1.5e6 -> "1.5M".
export function count(v) {
  if (!isNum(v)) return DASH;
  const sign = v < 0 ? '-' : '';
  const a = Math.abs(v);
  if (a < 1000) return sign + (Number.isInteger(a) ? String(a) : trim(a, a < 10 ? 1 : 0));
  for (const [div, unit] of [[1e3, 'k'], [1e6, 'M'], [1e9, 'G'], [1e12, 'T']]) {
    const x = a / div;
    if (x < 999.5 || unit === 'T') return sign + trim(x, x < 10 ? 1 : 0) + unit;
  }
  return sign + String(a);
}

// Per-second rate: 0 -> "0/s", 0.25 -> "0.25/s", 1234 -> "1.2k/s".
export function rate(v) {
  if (!isNum(v)) return DASH;
  if (v !== 0 && Math.abs(v) < 1) return trim(v, 2) + '/s';
  return count(Math.abs(v) < 10 ? Math.round(v * 10) / 10 : Math.round(v)) + '/s';
}

// Seconds as a short human duration: 0.4 -> "0.4s", 192 -> "3m 12s", 90061 -> "1d 1h".
export function duration(s) {
  if (!isNum(s)) return DASH;
  if (s < 0) s = 0;
  if (s < 10) return trim(s, 1) + 's';
  s = Math.round(s);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (d) return h ? `${d}d ${h}h` : `${d}d`;
  if (h) return m ? `${h}h ${m}m` : `${h}h`;
  if (m) return sec ? `${m}m ${sec}s` : `${m}m`;
  return `${sec}s`;
}

// Milliseconds: 0.35 -> "0.35 ms", 850 -> "850 ms", 1530 -> "1.5 s", 95000 -> "1m 35s".
export function ms(v) {
  if (!isNum(v)) return DASH;
  if (v < 1) return trim(v, 2) + ' ms';
  if (v < 10) return trim(v, 1) + ' ms';
  if (Math.round(v) < 1000) return Math.round(v) + ' ms';
  if (v < 60000) return trim(v / 1000, 1) + ' s';
  return duration(v / 1000);
}

// Unix seconds -> "3m 12s ago" relative to now (unix seconds).
export function ago(ts, now = Date.now() / 1000) {
  if (!isNum(ts)) return DASH;
  return duration(Math.max(0, now - ts)) + ' ago';
}

// Unix seconds -> local "HH:MM:SS" (today) or "YYYY-MM-DD HH:MM".
export function time(ts, now = Date.now() / 1000) {
  if (!isNum(ts)) return DASH;
  const d = new Date(ts * 1000);
  const p = (n) => String(n).padStart(2, '0');
  const hms = `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  if (Math.abs(now - ts) < 86400) return hms;
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${hms.slice(0, 5)}`;
}

// JSON body preview, cut to `max` characters.
export function preview(body, max = 160) {
  let s;
  try {
    s = typeof body === 'string' ? body : JSON.stringify(body);
  } catch {
    s = String(body);
  }
  if (s === undefined) s = String(body);
  return s.length > max ? s.slice(0, max - 1) + '…' : s;
}

function trim(x, digits) {
  return String(Number(x.toFixed(digits)));
}
