// Unit tests of web/presque.js against a fake WebSocket: `node --test web/test/`.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { backoffDelay, Connection, connect, errorText, wsUrl } from '../presque.js';

// A scripted socket: the test plays the broker through `reply` / `serverClose`.
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
    queueMicrotask(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.();
    });
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code: 1000 }));
  }
  reply(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  serverClose(code = 1001) {
    this.readyState = 3;
    this.onclose?.({ code });
  }
  last(op) {
    return this.sent.findLast((f) => f.op === op);
  }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
const latest = () => FakeSocket.all.at(-1);
const opts = (extra = {}) => ({ WebSocket: FakeSocket, backoff: { base: 1, max: 2 }, onerror: () => {}, ...extra });

test('wsUrl maps http(s) to ws(s) and defaults to /ws', () => {
  assert.equal(wsUrl(undefined, 'https://b.example/dash#/x'), 'wss://b.example/ws');
  assert.equal(wsUrl('/ws', 'http://localhost:5000/'), 'ws://localhost:5000/ws');
  assert.equal(wsUrl('http://h:1/ws/q'), 'ws://h:1/ws/q');
  assert.equal(wsUrl('wss://h/ws'), 'wss://h/ws');
});

test('backoffDelay grows, is capped and jittered', () => {
  assert.equal(backoffDelay(0, { base: 100, max: 1000, random: () => 0 }), 50);
  assert.equal(backoffDelay(0, { base: 100, max: 1000, random: () => 1 }), 100);
  assert.equal(backoffDelay(3, { base: 100, max: 1000, random: () => 1 }), 800);
  assert.equal(backoffDelay(50, { base: 100, max: 1000, random: () => 1 }), 1000);
});

test('errorText', () => {
  assert.equal(errorText(new TypeError('boom')), 'TypeError: boom');
  assert.equal(errorText('plain'), 'Error: plain');
});

test('handler return acks with result, throw nacks with error and delay', async () => {
  const conn = await connect('ws://x/ws', opts());
  const ws = latest();
  const settled = [];
  const sub = conn.subscribe('q', async (job) => {
    if (job.body.fail) {
      const err = new RangeError('bad');
      err.delay = 5;
      throw err;
    }
    return { ok: job.attempt };
  }, { prefetch: 2, onsettled: (job, outcome) => settled.push([job.id, outcome]) });
  const subFrame = ws.last('subscribe');
  assert.deepEqual({ ...subFrame, ref: undefined }, { op: 'subscribe', queue: 'q', prefetch: 2, ack: 'manual', ref: undefined });
  ws.reply({ op: 'subscribed', queue: 'q', ref: subFrame.ref });
  await sub;

  ws.reply({ op: 'job', queue: 'q', id: 'j1', token: 't1', attempt: 1, body: {} });
  ws.reply({ op: 'job', queue: 'q', id: 'j2', token: 't2', attempt: 3, body: { fail: true } });
  await tick();
  const ack = ws.last('ack');
  assert.deepEqual([ack.id, ack.token, ack.result], ['j1', 't1', { ok: 1 }]);
  const nack = ws.last('nack');
  assert.deepEqual([nack.id, nack.token, nack.error, nack.delay], ['j2', 't2', 'RangeError: bad', 5]);
  ws.reply({ op: 'ok', ref: ack.ref });
  ws.reply({ op: 'error', ref: nack.ref, error: 'stale', code: 'stale_token' });
  await tick();
  assert.deepEqual(settled, [['j1', 'acked'], ['j2', 'lost']]);
  conn.close();
});

test('push resolves the id; errors reject with code; a disconnect rejects and never resends', async () => {
  const states = [];
  const conn = await connect('ws://x/ws', opts({ onstatechange: (s) => states.push(s) }));
  let ws = latest();
  const p1 = conn.push('q', { a: 1 }, { priority: 9, uniq: 'u', nope: 1 });
  const f1 = ws.last('push');
  assert.deepEqual([f1.queue, f1.body, f1.priority, f1.uniq, f1.nope], ['q', { a: 1 }, 9, 'u', undefined]);
  ws.reply({ op: 'pushed', ref: f1.ref, id: 'id1' });
  assert.equal(await p1, 'id1');

  const p2 = conn.pushMany('q', [1, 2]);
  ws.reply({ op: 'pushed', ref: ws.last('push').ref, ids: ['a', 'b'] });
  assert.deepEqual(await p2, ['a', 'b']);

  const p3 = conn.push('bad name', 1);
  ws.reply({ op: 'error', ref: ws.last('push').ref, error: 'bad queue name', code: 'bad_queue' });
  await assert.rejects(p3, (e) => e.code === 'bad_queue' && e.message === 'bad queue name' && e.request.queue === 'bad name');

  const p4 = conn.push('q', 2);
  ws.serverClose();
  await assert.rejects(p4, (e) => e.code === 'disconnected');
  await tick(20);
  ws = latest();
  assert.notEqual(ws, FakeSocket.all[0]);
  assert.equal(ws.sent.filter((f) => f.op === 'push').length, 0);
  assert.deepEqual(states, ['connecting', 'open', 'reconnecting', 'open']);
  await assert.rejects(() => (conn.close(), conn.push('q', 1)), (e) => e.code === 'disconnected');
  assert.equal(conn.state, 'closed');
});

test('reconnect re-sends subscribe, listen and watch; stale jobs are not acked', async () => {
  const conn = await connect('ws://x/ws', opts());
  let ws = latest();
  let release;
  const settled = [];
  conn.subscribe('q', () => new Promise((r) => (release = r)), { onsettled: (j, o) => settled.push(o) });
  const messages = [];
  conn.listen('news', (data) => messages.push(data));
  const stats = [];
  conn.watch('stats', (f) => stats.push(f.ts));
  const events = [];
  conn.watch('events', (f) => events.push(f.event), { queue: 'q' });
  assert.deepEqual(ws.sent.map((f) => f.op), ['subscribe', 'listen', 'watch', 'watch']);
  assert.equal(ws.sent[3].queue, 'q');

  ws.reply({ op: 'job', queue: 'q', id: 'j1', token: 't1', attempt: 1, body: 1 });
  ws.reply({ op: 'message', channel: 'news', data: 'hi' });
  ws.reply({ op: 'stats', ts: 1 });
  ws.reply({ op: 'event', queue: 'q', id: 'j1', event: 'delivered' });
  ws.reply({ op: 'event', queue: 'other', id: 'x', event: 'pushed' });
  assert.deepEqual([messages, stats, events], [['hi'], [1], ['delivered']]);

  ws.reply({ op: 'shutdown' });
  ws.serverClose(1001);
  await tick(20);
  const old = ws;
  ws = latest();
  assert.notEqual(ws, old);
  assert.deepEqual(ws.sent.map((f) => f.op), ['subscribe', 'listen', 'watch', 'watch']);
  release('done');
  await tick();
  assert.equal(ws.sent.filter((f) => f.op === 'ack').length, 0);
  assert.deepEqual(settled, ['lost']);

  conn.unwatch('events', undefined, { queue: 'q' });
  assert.deepEqual(ws.last('unwatch'), { op: 'unwatch', topic: 'events', queue: 'q', ref: ws.last('unwatch').ref });
  conn.close();
});

test('auth frame first; forbidden closes for good until setToken', async () => {
  const states = [];
  const conn = new Connection('ws://x/ws', opts({ token: 'bad', onstatechange: (s) => states.push(s) }));
  conn.watch('stats', () => {});
  conn.open();
  await tick();
  let ws = latest();
  assert.deepEqual(ws.sent.map((f) => f.op), ['auth']);
  ws.reply({ op: 'error', ref: ws.sent[0].ref, error: 'bad token', code: 'forbidden' });
  await assert.rejects(conn.ready, (e) => e.code === 'forbidden');
  assert.equal(conn.state, 'closed');
  assert.equal(conn.error.code, 'forbidden');

  conn.setToken('good');
  await tick();
  ws = latest();
  assert.equal(ws.sent[0].token, 'good');
  ws.reply({ op: 'ok', ref: ws.sent[0].ref });
  await tick();
  assert.equal(conn.state, 'open');
  assert.deepEqual(ws.sent.map((f) => f.op), ['auth', 'watch']);
  assert.deepEqual(states, ['connecting', 'closed', 'connecting', 'open']);
  conn.close();
});

test('a subscribe the broker refuses rejects and is forgotten', async () => {
  const conn = await connect('ws://x/ws', opts());
  const ws = latest();
  const p = conn.subscribe('q', () => {});
  ws.reply({ op: 'error', ref: ws.last('subscribe').ref, error: 'no', code: 'forbidden' });
  await assert.rejects(p, (e) => e.code === 'forbidden');
  const p2 = conn.subscribe('q', () => {});
  ws.reply({ op: 'subscribed', queue: 'q', ref: ws.last('subscribe').ref });
  await p2;
  conn.close();
});
