// The browser-consumer demo (/examples/consumer.html): a tab that works on a queue.

import { Connection } from '/static/presque.js';

const MAX_ITEMS = 100;
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const counts = { received: 0, acked: 0, failed: 0, inflight: 0, lost: 0, pushed: 0 };
const items = new WeakMap(); // job -> <li> (a redelivered job is a new job object)

const params = new URLSearchParams(location.search);
if (params.has('token')) localStorage.setItem('presque.token', params.get('token'));
const token = params.get('token') || localStorage.getItem('presque.token');

const conn = new Connection(undefined, { token, onstatechange: showState, onerror: (err) => say(`${err.message} (${err.code})`) });
let queue = null;

function showState(state) {
  const label = conn.error ? 'unauthorized' : state === 'open' ? 'live' : state;
  $('conn-state').dataset.state = label;
  $('conn-state').querySelector('.label').textContent = label;
  if (conn.error) say(`The broker refused the token: ${conn.error.message}. Open this page with ?token=…`);
}

function say(text) {
  $('notice').textContent = text;
  $('notice').dataset.kind = 'error';
  $('notice').hidden = !text;
}

function bump(name, by = 1) {
  counts[name] += by;
  const el = $(`count-${name}`);
  el.textContent = String(counts[name]);
  el.dataset.value = String(counts[name]);
}

function subState(state, text) {
  $('sub-state').dataset.state = state;
  $('sub-state').textContent = text;
}

function addItem(job) {
  const li = document.createElement('li');
  li.dataset.testid = 'job-item';
  li.dataset.job = job.id;
  li.dataset.attempt = String(job.attempt);
  li.dataset.outcome = 'running';
  const badge = Object.assign(document.createElement('span'), { className: 'badge', textContent: 'running' });
  const id = Object.assign(document.createElement('code'), { textContent: job.id });
  const body = Object.assign(document.createElement('code'), { textContent: JSON.stringify(job.body).slice(0, 200) });
  const attempt = Object.assign(document.createElement('span'), { className: 'muted', textContent: `attempt ${job.attempt}` });
  li.append(badge, id, attempt, body);
  $('job-list').prepend(li);
  items.set(job, li);
  while ($('job-list').childElementCount > MAX_ITEMS) $('job-list').lastElementChild.remove();
}

function settle(job, outcome, err) {
  bump('inflight', -1);
  if (outcome === 'acked') bump('acked');
  else if (outcome === 'nacked') bump('failed');
  else bump('lost');
  const li = items.get(job);
  if (!li) return;
  li.dataset.outcome = outcome;
  li.querySelector('.badge').textContent = outcome;
  if (err) li.title = String(err.message ?? err);
}

// The work: wait a while, fail now and then. A return acks, a throw nacks.
async function work(job) {
  bump('received');
  bump('inflight');
  addItem(job);
  const delay = Math.max(0, Number($('delay-input').value) || 0);
  if (delay >= 1000) {
    await sleep(delay / 2);
    await job.progress({ done: 0.5 }).catch(() => {});
    await sleep(delay / 2);
  } else {
    await sleep(delay);
  }
  if (Math.random() * 100 < Number($('fail-input').value)) throw new Error('simulated failure');
  return { handled_by: 'browser', at: new Date().toISOString() };
}

async function consume(name) {
  if (queue) await conn.unsubscribe(queue).catch(() => {});
  queue = name;
  const url = new URL(location.href);
  url.searchParams.set('queue', name);
  url.searchParams.delete('token');
  history.replaceState(null, '', url);
  subState('subscribing', `Subscribing to ${name}…`);
  const prefetch = Math.max(1, Number($('prefetch-input').value) || 10);
  try {
    await conn.subscribe(name, work, { prefetch, onsettled: settle });
    if (queue !== name) return;
    subState('subscribed', `Consuming ${name} (prefetch ${prefetch}).`);
    $('btn-unsubscribe').disabled = false;
  } catch (err) {
    if (queue === name) queue = null;
    subState('error', `Could not subscribe to ${name}: ${err.message} (${err.code})`);
  }
}

$('consume-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  consume($('queue-input').value.trim());
});

$('btn-unsubscribe').addEventListener('click', async () => {
  const name = queue;
  queue = null;
  $('btn-unsubscribe').disabled = true;
  await conn.unsubscribe(name).catch(() => {});
  subState('idle', `Stopped consuming ${name}.`);
});

$('push-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  let body;
  try {
    body = JSON.parse($('push-body').value);
  } catch (err) {
    return say(`The job body is not JSON: ${err.message}`);
  }
  const target = queue ?? $('queue-input').value.trim();
  const n = Math.max(1, Number($('push-count').value) || 1);
  try {
    const ids = n === 1 ? [await conn.push(target, body)] : await conn.pushMany(target, Array(n).fill(body));
    bump('pushed', ids.length);
    $('push-result').textContent = ids.at(-1);
    say('');
  } catch (err) {
    say(`Push failed: ${err.message} (${err.code})`);
  }
});

$('btn-clear').addEventListener('click', () => {
  $('job-list').replaceChildren();
});

$('queue-input').value = params.get('queue') || 'demo';
conn.open();
consume($('queue-input').value);
