// presque.js — the browser client for the presque broker. One ES module, no dependencies.
//
//   import { connect } from '/static/presque.js';
//   const conn = await connect();                       // same-origin /ws
//   await conn.subscribe('emails', async (job) => { await send(job.body); return 'sent'; });
//   const id = await conn.push('emails', { to: 'a@example.com' });
//
// A handler that returns (or resolves) acks the job with its value as `result`; one that throws
// nacks it with `error` = "Name: message" (an error's numeric `delay` property, in seconds, sets
// the retry delay). The connection reconnects by itself with exponential backoff and jitter and
// then re-sends every subscribe, listen and watch. A push whose `pushed` reply was not seen
// before a disconnect rejects with code "disconnected" and is never re-sent: push with `uniq`
// when a retry must not create a second job. See docs/dashboard.md, "Browser client".

export const STATES = Object.freeze(['connecting', 'open', 'reconnecting', 'closed']);

const PUSH_OPTIONS = ['priority', 'delay', 'uniq', 'ttl', 'max_attempts'];
const AUTH_TIMEOUT_MS = 10000;
const DEFAULT_LEASE_S = 30;

/** An error answered by the broker (`code` is its error code) or raised by the client. */
export class PresqueError extends Error {
  constructor(message, code, frame = null) {
    super(message);
    this.name = 'PresqueError';
    this.code = code;
    this.frame = frame; // the broker's error frame, if any
    this.request = null; // the client frame it answers, if known
  }
}

/** Resolve `url` (default "/ws") against the page and map http(s) to ws(s). */
export function wsUrl(url, base = globalThis.location?.href ?? 'http://localhost/') {
  const u = new URL(url ?? '/ws', base);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  return u.href;
}

/** Milliseconds to wait before reconnect attempt number `attempt` (0-based): "equal jitter". */
export function backoffDelay(attempt, { base = 250, max = 15000, random = Math.random } = {}) {
  const cap = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.round(cap / 2 + (random() * cap) / 2);
}

/** The `error` text a nack carries for a thrown value. */
export function errorText(err) {
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  return `Error: ${typeof err === 'string' ? err : JSON.stringify(err) ?? String(err)}`;
}

/** A delivered job. `token` is null for auto-ack subscriptions. */
export class Job {
  constructor(conn, frame, gen) {
    this.id = frame.id;
    this.queue = frame.queue;
    this.attempt = frame.attempt;
    this.body = frame.body;
    this.token = frame.token ?? null;
    this.done = false;
    this._conn = conn;
    this._gen = gen;
  }

  /** Report progress (any JSON); shows in the broker's job events. */
  progress(data) {
    return this._conn._jobOp(this, { op: 'progress', data });
  }

  /** Extend the lease. Subscriptions touch running jobs by themselves (see `autoTouch`). */
  touch() {
    return this._conn._jobOp(this, { op: 'touch' });
  }
}

/** Open a connection and resolve once it is open (and authenticated, when a token is given). */
export async function connect(url, options = {}) {
  const conn = new Connection(url, options);
  conn.open();
  await conn.ready;
  return conn;
}

export class Connection {
  /**
   * @param {string} [url] WebSocket or http(s) URL, default same-origin "/ws".
   * @param {object} [options] token, onstatechange(state), onerror(PresqueError),
   *   backoff {base, max} in ms, WebSocket (constructor, for tests).
   */
  constructor(url, { token = null, onstatechange = null, onerror = null, backoff = {}, WebSocket = null } = {}) {
    this.url = wsUrl(url);
    this.token = token;
    this.state = 'closed';
    this.error = null; // set when the broker refused the token
    this.onstatechange = onstatechange;
    this.onerror = onerror;
    this._backoff = backoff;
    this._WS = WebSocket ?? globalThis.WebSocket;
    this._ws = null;
    this._gen = 0; // one per socket; stale callbacks and job tokens are ignored
    this._attempt = 0;
    this._timer = null;
    this._stopped = true;
    this._everOpen = false;
    this._refs = 0;
    this._pending = new Map(); // ref -> {resolve, reject}
    this._subs = new Map(); // queue -> subscription
    this._listens = new Map(); // channel -> {handlers: Set, confirm}
    this._watches = new Map(); // "topic" or "topic:queue" -> {frame, handlers: Set, confirm}
    this.ready = new Promise((resolve, reject) => (this._ready = { resolve, reject }));
    this.ready.catch(() => {});
  }

  /** Start connecting (idempotent). `connect()` calls this. */
  open() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._open();
    return this;
  }

  /** Close for good: pending requests reject with code "disconnected", nothing reconnects. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    const err = new PresqueError('connection closed', 'disconnected');
    this._drop(err);
    this._ready.reject(err); // no-op once it was open
    this._setState('closed');
  }

  /** Drop the socket and reconnect now (e.g. after a stalled feed). */
  reconnect() {
    if (this._stopped) return this.open();
    clearTimeout(this._timer);
    this._drop(new PresqueError('reconnecting', 'disconnected'));
    this._attempt = 0;
    this._open();
  }

  /** Use another token and reconnect (also after the broker refused the previous one). */
  setToken(token) {
    this.token = token || null;
    this.error = null;
    if (this._stopped) this.open();
    else this.reconnect();
  }

  // ---- consuming -----------------------------------------------------------------------------

  /**
   * Consume `queue`: `handler(job)` may be async; its return value acks, a throw nacks.
   * Options: prefetch (10), lease (seconds), ack ("manual" | "auto"), autoTouch (true: touch
   * running jobs every lease/2 s), onsettled(job, "acked" | "nacked" | "lost", error?).
   * Resolves when the broker confirms with `subscribed`.
   */
  subscribe(queue, handler, { prefetch = 10, lease, ack = 'manual', autoTouch = true, onsettled = null } = {}) {
    if (this._subs.has(queue)) return Promise.reject(new PresqueError(`already subscribed to ${queue}`, 'bad_field'));
    const frame = { op: 'subscribe', queue, prefetch, ack };
    if (lease != null) frame.lease = lease;
    const sub = { frame, handler, autoTouch, onsettled, lease: lease ?? DEFAULT_LEASE_S, active: 0 };
    this._subs.set(queue, sub);
    return this._register(sub, () => this._subs.delete(queue));
  }

  /** Stop receiving from `queue`; jobs already received still run and settle. */
  unsubscribe(queue) {
    if (!this._subs.delete(queue)) return Promise.resolve();
    return this._request({ op: 'unsubscribe', queue }).catch((e) => this._ignoreDisconnect(e));
  }

  // ---- producing -----------------------------------------------------------------------------

  /** Push one job; resolves with its id. Options: priority, delay, uniq, ttl, max_attempts. */
  push(queue, body, options = {}) {
    const frame = { op: 'push', queue, body };
    for (const k of PUSH_OPTIONS) if (options[k] != null) frame[k] = options[k];
    return this._request(frame).then((r) => r.id);
  }

  /** Push a batch atomically; resolves with the ids in order. */
  pushMany(queue, bodies) {
    return this._request({ op: 'push', queue, jobs: bodies }).then((r) => r.ids);
  }

  /** Broadcast `data` to every listener of `channel` (at most once, not stored). */
  publish(channel, data) {
    return this._request({ op: 'publish', channel, data }).then(() => undefined);
  }

  /** Call `handler(data, frame)` for each message on `channel`. Resolves on `listening`. */
  listen(channel, handler) {
    let entry = this._listens.get(channel);
    if (entry) {
      entry.handlers.add(handler);
      return entry.confirmed ?? Promise.resolve();
    }
    entry = { frame: { op: 'listen', channel }, handlers: new Set([handler]) };
    this._listens.set(channel, entry);
    return this._register(entry, () => this._listens.delete(channel));
  }

  /** Stop calling `handler` (all handlers when omitted); the last one gone sends `unlisten`. */
  unlisten(channel, handler) {
    const entry = this._listens.get(channel);
    if (!entry) return Promise.resolve();
    if (handler) entry.handlers.delete(handler);
    if (handler && entry.handlers.size) return Promise.resolve();
    this._listens.delete(channel);
    return this._request({ op: 'unlisten', channel }).catch((e) => this._ignoreDisconnect(e));
  }

  // ---- watching ------------------------------------------------------------------------------

  /**
   * Watch a topic: "stats" (handler gets each stats frame) or "events" with {queue} (handler
   * gets each event frame). Resolves on `watching`.
   */
  watch(topic, handler, { queue } = {}) {
    const key = watchKey(topic, queue);
    let entry = this._watches.get(key);
    if (entry) {
      entry.handlers.add(handler);
      return entry.confirmed ?? Promise.resolve();
    }
    const frame = { op: 'watch', topic };
    if (queue != null) frame.queue = queue;
    entry = { frame, handlers: new Set([handler]) };
    this._watches.set(key, entry);
    return this._register(entry, () => this._watches.delete(key));
  }

  /** Remove `handler` (or all); the last one gone sends `unwatch`. */
  unwatch(topic, handler, { queue } = {}) {
    const key = watchKey(topic, queue);
    const entry = this._watches.get(key);
    if (!entry) return Promise.resolve();
    if (handler) entry.handlers.delete(handler);
    if (handler && entry.handlers.size) return Promise.resolve();
    this._watches.delete(key);
    const frame = { op: 'unwatch', topic };
    if (queue != null) frame.queue = queue;
    return this._request(frame).catch((e) => this._ignoreDisconnect(e));
  }

  // ---- internals -----------------------------------------------------------------------------

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.onstatechange?.(state);
  }

  _emitError(err) {
    if (this.onerror) this.onerror(err);
    else console.warn('presque:', err.code, err.message);
  }

  _ignoreDisconnect(err) {
    if (err.code !== 'disconnected') throw err;
  }

  _open() {
    const gen = ++this._gen;
    this._setState(this._everOpen ? 'reconnecting' : 'connecting');
    let ws;
    try {
      ws = new this._WS(this.url);
    } catch (err) {
      this._emitError(new PresqueError(String(err?.message ?? err), 'unavailable'));
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = () => gen === this._gen && this._handshake(gen);
    ws.onmessage = (ev) => gen === this._gen && this._onFrame(ev.data);
    ws.onclose = () => gen === this._gen && this._onClose();
    ws.onerror = () => {}; // a close event follows
  }

  _handshake(gen) {
    if (!this.token) return this._onOpen();
    const timer = setTimeout(() => gen === this._gen && this._ws?.close(4000, 'auth timeout'), AUTH_TIMEOUT_MS);
    this._request({ op: 'auth', token: this.token }, true).then(
      () => this._onOpen(),
      (err) => {
        if (gen !== this._gen) return;
        if (err.code === 'unknown_op') return this._onOpen(); // a broker without auth
        if (err.code !== 'forbidden') return; // the close that follows reconnects
        this.error = err;
        this._stopped = true;
        this._drop(err);
        this._ready.reject(err);
        this._setState('closed');
        this._emitError(err);
      },
    ).finally(() => clearTimeout(timer));
  }

  _onOpen() {
    this._attempt = 0;
    this._everOpen = true;
    this._setState('open');
    this._ready.resolve(this);
    for (const sub of this._subs.values()) this._sendRegistration(sub);
    for (const entry of this._listens.values()) this._sendRegistration(entry);
    for (const entry of this._watches.values()) this._sendRegistration(entry);
  }

  _onClose() {
    this._drop(new PresqueError('connection lost before the broker confirmed', 'disconnected'));
    if (this._stopped) this._setState('closed');
    else this._scheduleReconnect();
  }

  // Forget the socket: every unanswered request rejects, held jobs' tokens go stale.
  _drop(err) {
    const ws = this._ws;
    this._ws = null;
    this._gen++;
    if (ws && ws.readyState <= 1) {
      try {
        ws.close(1000);
      } catch {
        // already closing
      }
    }
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) p.reject(err);
  }

  _scheduleReconnect() {
    this._setState('reconnecting');
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._open(), backoffDelay(this._attempt++, this._backoff));
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  // Send a frame with a fresh ref; resolve with the reply, reject with the error frame.
  _request(frame, duringHandshake = false) {
    if (this.state !== 'open' && !duringHandshake) {
      return Promise.reject(new PresqueError('not connected', 'disconnected'));
    }
    const ref = `r${++this._refs}`;
    // An error carries the frame it answers as `request` (never the token of an auth frame).
    const request = frame.op === 'auth' ? { op: 'auth' } : frame;
    return new Promise((resolve, reject) => {
      this._pending.set(ref, { resolve, reject, request });
      if (!this._send({ ...frame, ref })) {
        this._pending.delete(ref);
        reject(new PresqueError('not connected', 'disconnected'));
      }
    });
  }

  // A subscription/listen/watch lives across reconnects; its promise settles on the first answer.
  _register(entry, forget) {
    entry.confirmed = new Promise((resolve, reject) => (entry.confirm = { resolve, reject, forget }));
    if (this.state === 'open') this._sendRegistration(entry);
    return entry.confirmed;
  }

  _sendRegistration(entry) {
    this._request(entry.frame).then(
      (reply) => {
        entry.confirm?.resolve(reply);
        entry.confirm = null;
      },
      (err) => {
        if (err.code === 'disconnected') return; // sent again after the reconnect
        if (entry.confirm) {
          entry.confirm.forget();
          entry.confirm.reject(err);
          entry.confirm = null;
        } else {
          this._emitError(err);
        }
      },
    );
  }

  _onFrame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return this._emitError(new PresqueError('unparseable frame from the broker', 'bad_json'));
    }
    if (!f || typeof f !== 'object') return;
    switch (f.op) {
      case 'job':
        return this._onJob(f);
      case 'message':
        return this._dispatch(this._listens.get(f.channel), f.data, f);
      case 'stats':
        return this._dispatch(this._watches.get('stats'), f);
      case 'event':
        return this._dispatch(this._watches.get(watchKey('events', f.queue)), f);
      case 'shutdown':
        return; // the broker closes with 1001 next; the close reconnects
    }
    const p = f.ref != null ? this._pending.get(f.ref) : undefined;
    if (p) {
      this._pending.delete(f.ref);
      if (f.op !== 'error') return p.resolve(f);
      const err = new PresqueError(f.error ?? 'error', f.code ?? 'internal', f);
      err.request = p.request;
      p.reject(err);
    } else if (f.op === 'error') {
      this._emitError(new PresqueError(f.error ?? 'error', f.code ?? 'internal', f));
    }
  }

  _dispatch(entry, ...args) {
    if (!entry) return;
    for (const handler of entry.handlers) {
      try {
        handler(...args);
      } catch (err) {
        console.error('presque: handler failed', err);
      }
    }
  }

  _onJob(f) {
    const sub = this._subs.get(f.queue);
    if (!sub) return; // unsubscribed meanwhile: its lease expires or the disconnect returns it
    this._run(sub, new Job(this, f, this._gen));
  }

  async _run(sub, job) {
    sub.active++;
    let timer = null;
    if (job.token && sub.autoTouch) {
      timer = setInterval(() => job.touch().catch(() => {}), (sub.lease * 1000) / 2);
    }
    let ok = true;
    let value;
    try {
      value = await sub.handler(job);
    } catch (err) {
      ok = false;
      value = err;
    } finally {
      clearInterval(timer);
      sub.active--;
    }
    job.done = true;
    const settled = (outcome, err) => {
      try {
        sub.onsettled?.(job, outcome, err);
      } catch (e) {
        console.error('presque: onsettled failed', e);
      }
    };
    if (!job.token) return settled(ok ? 'acked' : 'nacked', ok ? undefined : value);
    if (job._gen !== this._gen) {
      return settled('lost', new PresqueError('connection lost while the job ran', 'disconnected'));
    }
    const frame = { op: ok ? 'ack' : 'nack', id: job.id, token: job.token };
    if (ok && value !== undefined) frame.result = value;
    if (!ok) {
      frame.error = errorText(value);
      if (typeof value?.delay === 'number') frame.delay = value.delay;
    }
    try {
      await this._request(frame);
      settled(ok ? 'acked' : 'nacked', ok ? undefined : value);
    } catch (err) {
      settled('lost', err);
      if (err.code !== 'disconnected') this._emitError(err);
    }
  }

  _jobOp(job, frame) {
    if (job.done) return Promise.reject(new PresqueError('job already settled', 'stale_token'));
    if (!job.token) return Promise.resolve();
    if (job._gen !== this._gen) return Promise.reject(new PresqueError('connection lost', 'disconnected'));
    return this._request({ ...frame, id: job.id, token: job.token }).then(() => undefined);
  }
}

function watchKey(topic, queue) {
  return queue == null ? topic : `${topic}:${queue}`;
}
