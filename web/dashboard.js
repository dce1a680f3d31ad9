// The presque dashboard: one WebSocket stats feed (no polling) drives every number and chart.
// Views: the overview (#/) and one queue (#/queue/<name>, see queueview.js).

import { allows, api, getToken, hooks, saveToken } from './api.js';
import { Charts, History, RANGES, TOTAL } from './charts.js';
import * as fmt from './format.js';
import { Connection } from './presque.js';
import { QueueView } from './queueview.js';
import { h, notice, setNum, setText } from './ui.js';

const STALL_MS = 10000; // no stats frame for this long on an open socket: reconnect

const TOTAL_CARDS = [
  ['ready', 'Ready', fmt.count], ['delayed', 'Delayed', fmt.count], ['leased', 'Leased', fmt.count],
  ['dead', 'Dead', fmt.count], ['push_rate', 'Push', fmt.rate], ['ack_rate', 'Ack', fmt.rate],
  ['consumers', 'Consumers', fmt.count], ['queues', 'Queues', fmt.count], ['pushed', 'Pushed', fmt.count],
  ['processed', 'Processed', fmt.count], ['failed', 'Failed', fmt.count], ['retried', 'Retried', fmt.count],
  ['dead_lettered', 'Dead-lettered', fmt.count], ['expired', 'Expired', fmt.count],
];
const QUEUE_CARDS = [
  ...TOTAL_CARDS.slice(0, 7),
  ['oldest_age', 'Oldest waiting', fmt.duration], ['latency_p50', 'Latency p50', fmt.ms],
  ['latency_p99', 'Latency p99', fmt.ms], ...TOTAL_CARDS.slice(8),
];
const COLUMNS = [
  ['ready', 'Ready', fmt.count], ['delayed', 'Delayed', fmt.count], ['leased', 'Leased', fmt.count],
  ['dead', 'Dead', fmt.count], ['consumers', 'Consumers', fmt.count],
  ['paused', 'State', (v) => (v ? 'paused' : 'active')], ['push_rate', 'Push/s', fmt.rate],
  ['ack_rate', 'Ack/s', fmt.rate], ['oldest_age', 'Oldest', fmt.duration], ['latency_p50', 'p50', fmt.ms],
  ['latency_p99', 'p99', fmt.ms],
];

const $ = (id) => document.getElementById(id);
const store = {
  get: (k) => { try { return localStorage.getItem(k); } catch { return null; } },
  set: (k, v) => { try { localStorage.setItem(k, v); } catch { /* private mode */ } },
};

const state = {
  stats: null,
  queue: null, // the queue shown, null on the overview
  range: RANGES[store.get('presque.range')] ? store.get('presque.range') : '15m',
  roles: null, // GET /auth's roles when auth is on: {role: [globs]}; null = not known to be limited
  denied: new Set(), // queues whose admin actions answered 403
  lastFrameAt: 0,
  statsWatched: false, // the broker confirmed the stats watch (the stall watchdog is armed)
  statsRefused: false, // the stats watch was refused (forbidden)
  wasOpen: false, // the connection was open before: a new open is a reconnect
  cards: new Map(), // field -> element
  rows: new Map(), // queue name -> {tr, cells}
};

let conn;
let charts;
let queueView;
let hist = new History(state.range);

function main() {
  const params = new URLSearchParams(location.search);
  if (params.has('token')) {
    saveToken(params.get('token'));
    params.delete('token');
    const query = params.toString();
    window.history.replaceState(null, '', location.pathname + (query ? `?${query}` : '') + location.hash);
  }
  conn = new Connection(undefined, { token: getToken(), onstatechange: showConnection, onerror: onConnectionError });
  hooks.onauth = (status, err, path) => {
    if (status === 401) askToken(getToken() ? 'The broker refused this token.' : 'This broker requires a token.');
    else if (path.startsWith('/stats')) notice(`This token may not read stats: ${err.message}`, 'error');
  };
  charts = new Charts($('charts'));
  queueView = new QueueView($('view-head'), $('queue-body'), {
    conn,
    adminDenied: (q) => state.denied.has(q) || (state.roles != null && !allows(state.roles, 'admin', q)),
    denyAdmin: (q) => state.denied.add(q),
  });

  $('theme-toggle').addEventListener('click', toggleTheme);
  matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => charts.show(hist, chartKey()));
  for (const r of Object.keys(RANGES)) $(`range-${r}`).addEventListener('click', () => setRange(r));
  $('token-button').addEventListener('click', () => askToken(''));
  $('token-button').hidden = !getToken();
  $('queue-filter').addEventListener('input', filterRows);
  window.addEventListener('hashchange', route);

  showRange();
  loadAuth();
  watchStats();
  conn.open();
  loadHistory();
  route();
  setInterval(watchdog, 2000);
}

// ---- connection --------------------------------------------------------------------------------

function watchStats() {
  conn.watch('stats', onStats).then(
    () => {
      state.statsWatched = true;
      state.statsRefused = false;
      state.lastFrameAt = Date.now();
      showConnection(conn.state);
    },
    (err) => {
      if (err.code === 'forbidden') statsRefused(err);
      else if (err.code !== 'disconnected') notice(`Cannot watch stats: ${err.message}`, 'error');
    },
  );
}

// Without a token: ask for one. With one that may not watch stats: say so (the Token button stays).
function statsRefused(err) {
  state.statsRefused = true;
  showConnection(conn.state);
  if (!getToken()) askToken('This broker requires a token.');
  else notice(`This token may not watch the live stats: ${err.message}`, 'error');
}

// What the token may do (GET /auth), so the page hides what it may not instead of failing.
async function loadAuth() {
  let me = null;
  try {
    me = await api('GET', '/auth');
  } catch {
    // an older broker without /auth, or a 401 (the hook asks for a token)
  }
  state.roles = me?.auth ? me.roles ?? {} : null;
  const button = $('token-button');
  button.hidden = !me?.auth && !getToken();
  button.textContent = me?.name ? `Token: ${me.name}` : 'Token';
  if (me?.auth && !me.name) askToken('This broker requires a token.');
  else if (me?.auth && !allows(me.roles, 'admin', '*')) {
    notice(`Token “${me.name}” lacks the admin role on every queue (“*”): live stats are not available to it.`, 'error');
  }
  queueView.applyAdmin();
}

function showConnection(connState) {
  const refused = conn?.error?.code === 'forbidden' || (connState === 'open' && state.statsRefused);
  const label = refused ? 'unauthorized' : connState === 'open' ? 'live' : connState;
  const el = $('conn-state');
  el.dataset.state = label;
  setText(el.querySelector('.label'), label);
  if (connState === 'open') {
    state.lastFrameAt = Date.now();
    if (state.wasOpen) {
      loadHistory(); // fill what the outage missed
      if (state.queue) queueView.show(state.queue);
    }
    state.wasOpen = true;
  }
}

function onConnectionError(err) {
  if (err.code === 'forbidden' && conn?.error) {
    askToken('The broker refused this token.');
  } else if (err.code === 'forbidden' && err.request?.op === 'watch' && err.request.topic === 'stats') {
    statsRefused(err);
  } else if (err.code !== 'disconnected') {
    notice(`Broker: ${err.message} (${err.code})`, 'error');
  }
}

function watchdog() {
  if (conn.state === 'open' && state.statsWatched && Date.now() - state.lastFrameAt > STALL_MS) {
    state.lastFrameAt = Date.now();
    conn.reconnect();
  }
}

function askToken(reason) {
  const dialog = $('auth');
  if (dialog.open) return;
  setText($('auth-reason'), reason);
  $('auth-token-input').value = '';
  $('auth-forget').hidden = !getToken();
  dialog.returnValue = '';
  dialog.addEventListener('close', () => {
    const token = $('auth-token-input').value.trim();
    if (dialog.returnValue === 'forget') saveToken(null);
    else if (dialog.returnValue === 'ok' && token) saveToken(token);
    else return;
    $('token-button').hidden = !getToken();
    conn.setToken(getToken());
    state.denied.clear();
    state.statsRefused = false;
    loadAuth();
    watchStats();
    loadHistory();
    if (state.queue) queueView.show(state.queue);
  }, { once: true });
  $('token-button').hidden = false;
  dialog.showModal();
  $('auth-token-input').focus();
}

// ---- stats -------------------------------------------------------------------------------------

function onStats(frame) {
  state.stats = frame;
  state.lastFrameAt = Date.now();
  if (hist.addFrame(frame)) charts.update(hist);
  const el = $('last-update');
  el.dataset.ts = String(frame.ts);
  setText(el, `updated ${fmt.time(frame.ts)}`);
  render();
}

function render() {
  const frame = state.stats;
  if (!frame) return;
  const source = state.queue ? frame.queues?.[state.queue] : frame.totals;
  for (const [field, el] of state.cards) setNum(el, source?.[field], el._fmt);
  if (state.queue) {
    queueView.update(frame.queues?.[state.queue]);
  } else {
    renderQueues(frame.queues ?? {});
    renderProcesses(frame.processes ?? []);
    renderWorkers(frame.workers ?? []);
  }
}

function buildCards(defs, prefix) {
  state.cards.clear();
  $('cards').replaceChildren(...defs.map(([field, label, f]) => {
    const value = h('span', { class: 'value', testid: `${prefix}${field}` }, '–');
    value._fmt = f;
    state.cards.set(field, value);
    return h('div', { class: `card card-${field}` }, h('span', { class: 'label' }, label), value);
  }));
}

function renderQueues(queues) {
  const names = Object.keys(queues).sort();
  const body = $('queue-rows');
  let order = false;
  for (const [name, row] of state.rows) {
    if (!(name in queues)) {
      row.tr.remove();
      state.rows.delete(name);
    }
  }
  for (const name of names) {
    let row = state.rows.get(name);
    if (!row) {
      row = queueRow(name);
      state.rows.set(name, row);
      order = true;
    }
    const q = queues[name];
    for (const [field, , f] of COLUMNS) setNum(row.cells[field], q[field], f);
    row.tr.classList.toggle('is-paused', !!q.paused);
  }
  if (order) {
    body.append(...names.map((n) => state.rows.get(n).tr));
    filterRows();
  }
  setNum($('queues-count'), names.length, (v) => `(${v})`);
  $('queues-empty').hidden = names.length > 0;
  $('queue-table').hidden = names.length === 0;
}

function queueRow(name) {
  const cells = {};
  const tds = COLUMNS.map(([field, label]) => {
    cells[field] = h('span', { testid: `queue-${name}-${field}` }, '–');
    return h('td', { 'data-label': label, class: field === 'paused' ? 'state' : 'num' }, cells[field]);
  });
  const link = h('a', { href: `#/queue/${encodeURIComponent(name)}`, testid: `queue-link-${name}` }, name);
  const tr = h('tr', { testid: `queue-row-${name}`, dataset: { queue: name } }, h('th', { scope: 'row' }, link), ...tds);
  return { tr, cells };
}

function filterRows() {
  const needle = $('queue-filter').value.trim().toLowerCase();
  for (const [name, row] of state.rows) row.tr.hidden = !!needle && !name.toLowerCase().includes(needle);
}

function renderProcesses(processes) {
  setNum($('processes-count'), processes.length, (v) => `(${v})`);
  const now = state.stats.ts;
  $('process-rows').replaceChildren(...processes.map((p) => h('tr', { testid: `process-row-${p.id}` },
    h('th', { scope: 'row' }, h('code', {}, p.id)),
    h('td', { 'data-label': 'Host:pid' }, `${p.host ?? '–'}:${p.pid ?? '–'}`),
    h('td', { 'data-label': 'Up', title: p.started_at ? new Date(p.started_at * 1000).toISOString() : '' },
      fmt.duration(p.started_at != null ? now - p.started_at : null)),
    h('td', { 'data-label': 'Connections', class: 'num' }, num(`process-${p.id}-connections`, p.connections)),
    h('td', { 'data-label': 'Consumers', class: 'num' }, num(`process-${p.id}-consumers`, p.consumers)))));
  $('processes-empty').hidden = processes.length > 0;
}

function renderWorkers(workers) {
  setNum($('workers-count'), workers.length, (v) => `(${v})`);
  $('worker-rows').replaceChildren(...workers.map((w) => h('tr', { testid: `worker-row-${w.id}` },
    h('th', { scope: 'row' }, h('code', {}, w.id)),
    h('td', { 'data-label': 'Host:pid' }, `${w.host ?? '–'}:${w.pid ?? '–'}`),
    h('td', { 'data-label': 'Queues' }, (w.queues ?? []).join(', ') || '–'),
    h('td', { 'data-label': 'Processed', class: 'num' }, num(`worker-${w.id}-processed`, w.processed)),
    h('td', { 'data-label': 'Failed', class: 'num' }, num(`worker-${w.id}-failed`, w.failed)),
    h('td', { 'data-label': 'Current' }, w.current == null ? '–' : h('code', {}, fmt.preview(w.current, 60))),
    h('td', { 'data-label': 'Registered' }, fmt.ago(w.registered_at, state.stats.ts)))));
  $('workers-empty').hidden = workers.length > 0;
}

function num(testid, value) {
  const el = h('span', { testid });
  setNum(el, value, fmt.count);
  return el;
}

// ---- charts ------------------------------------------------------------------------------------

function chartKey() {
  return state.queue ?? TOTAL;
}

async function loadHistory() {
  const range = state.range;
  try {
    const data = await api('GET', `/stats/history?range=${range}`);
    if (range !== state.range) return;
    hist.load(data);
    $('charts-note').hidden = true;
  } catch (err) {
    setText($('charts-note'), `No stored history (${err.message}); showing live data only.`);
    $('charts-note').hidden = false;
  }
  charts.show(hist, chartKey());
}

function setRange(range) {
  if (range === state.range) return;
  state.range = range;
  store.set('presque.range', range);
  hist = new History(range);
  showRange();
  charts.show(hist, chartKey());
  loadHistory();
}

function showRange() {
  for (const r of Object.keys(RANGES)) $(`range-${r}`).setAttribute('aria-pressed', String(r === state.range));
}

function toggleTheme() {
  const root = document.documentElement;
  const dark = root.dataset.theme ? root.dataset.theme === 'dark' : matchMedia('(prefers-color-scheme: dark)').matches;
  root.dataset.theme = dark ? 'light' : 'dark';
  store.set('presque.theme', root.dataset.theme);
  $('theme-toggle').setAttribute('aria-pressed', String(!dark));
  charts.show(hist, chartKey());
}

// ---- routing -----------------------------------------------------------------------------------

function route() {
  let queue = null;
  const m = location.hash.match(/^#\/queue\/(.+)$/);
  if (m) {
    try {
      queue = decodeURIComponent(m[1]);
    } catch {
      queue = m[1];
    }
  }
  state.queue = queue;
  $('overview').hidden = !!queue;
  $('queue-body').hidden = !queue;
  document.body.dataset.view = queue ? 'queue' : 'overview';
  if (queue) {
    buildCards(QUEUE_CARDS, 'qv-');
    queueView.show(queue);
    setText($('charts-title'), `Queue ${queue}`);
    document.title = `${queue} · presque`;
  } else {
    queueView.hide();
    $('view-head').replaceChildren(h('h1', { testid: 'overview-title', tabindex: '-1' }, 'All queues'));
    buildCards(TOTAL_CARDS, 'total-');
    setText($('charts-title'), 'All queues');
    document.title = 'presque';
  }
  $('view-head').querySelector('h1')?.setAttribute('tabindex', '-1');
  if (document.activeElement?.closest?.('#main') || m) $('view-head').querySelector('h1')?.focus();
  charts.show(hist, chartKey());
  render();
}

main();
