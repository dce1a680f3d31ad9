// The per-queue view (#/queue/<name>): controls, next ready jobs, dead letters, live events.

import { api, seg } from './api.js';
import * as fmt from './format.js';
import { busy, confirmDialog, h, notice, setNum, setText } from './ui.js';

const DEAD_PAGE = 50;
const MAX_EVENTS = 200;
const RELOAD_MIN_MS = 1500; // peek / dead list reload at most this often when the counts move

export class QueueView {
  /**
   * @param {HTMLElement} head  where the title and controls go
   * @param {HTMLElement} body  where the panels go
   * @param {object} ctx        {conn, adminDenied(name) -> bool, denyAdmin(name)}
   */
  constructor(head, body, ctx) {
    this.head = head;
    this.body = body;
    this.ctx = ctx;
    this.name = null;
    this.paused = null;
    this.deadOffset = 0;
    this.seen = {};
    this.timers = {};
    this.eventsPaused = false;
    this.onEvent = (f) => this._addEvent(f);
  }

  show(name) {
    this.hide();
    this.name = name;
    this.paused = null;
    this.pending = null;
    this.deadOffset = 0;
    this.seen = {};
    this._build();
    this.loadPeek();
    this.loadDead();
    this.ctx.conn
      .watch('events', this.onEvent, { queue: name })
      .catch((err) => setText(this.el.eventsNote, `Live events unavailable: ${err.message}`));
  }

  hide() {
    if (this.name == null) return;
    this.ctx.conn.unwatch('events', this.onEvent, { queue: this.name }).catch(() => {});
    for (const t of Object.values(this.timers)) clearTimeout(t);
    this.timers = {};
    this.name = null;
    this.head.replaceChildren();
    this.body.replaceChildren();
  }

  /** Called with each stats frame's entry for this queue (undefined when the queue is gone). */
  update(q) {
    if (this.name == null) return;
    this.el.missing.hidden = !!q;
    if (!q) return;
    // After a click, keep showing the new state until the feed agrees (or 5 s pass).
    if (!this.pending || this.pending.paused === !!q.paused || Date.now() > this.pending.until) {
      this.pending = null;
      this._setPaused(!!q.paused);
    }
    // Reload the lists when their counts move (not polling: only on change, rate-limited).
    if (this.seen.ready !== undefined && this.seen.ready !== q.ready) this._soon('peek', () => this.loadPeek());
    if (this.seen.dead !== undefined && this.seen.dead !== q.dead) this._soon('dead', () => this.loadDead());
    this.seen = { ready: q.ready, dead: q.dead };
  }

  _soon(what, fn) {
    if (this.timers[what]) return;
    this.timers[what] = setTimeout(() => {
      delete this.timers[what];
      fn();
    }, RELOAD_MIN_MS);
  }

  _setPaused(paused) {
    this.paused = paused;
    this.el.badge.hidden = !paused;
    this.el.pause.disabled = paused;
    this.el.resume.disabled = !paused;
    this.applyAdmin();
  }

  /** Show or hide the admin controls for what the token may do on this queue. */
  applyAdmin() {
    if (this.name == null) return;
    const denied = this.ctx.adminDenied(this.name);
    this.el.adminNote.hidden = !denied;
    for (const b of this.body.querySelectorAll('.admin')) b.hidden = denied;
    for (const b of this.head.querySelectorAll('.admin')) b.hidden = denied;
  }

  // An admin action: a 403 hides the admin controls of this queue.
  async _admin(button, action) {
    return busy(button, async () => {
      try {
        return await action();
      } catch (err) {
        if (err.status === 403) {
          this.ctx.denyAdmin(this.name);
          this.applyAdmin();
        }
        throw err;
      }
    });
  }

  _build() {
    const name = this.name;
    const el = (this.el = {});
    el.badge = h('span', { class: 'badge paused', testid: 'queue-paused', hidden: true }, 'paused');
    el.pause = h('button', { class: 'admin', testid: 'btn-pause', onclick: () => this._control('stop') }, 'Pause');
    el.resume = h('button', { class: 'admin', testid: 'btn-resume', onclick: () => this._control('start') }, 'Resume');
    el.purge = h('button', { class: 'admin danger', testid: 'btn-purge', onclick: () => this._purge() }, 'Purge…');
    el.missing = h('p', { class: 'muted', testid: 'queue-missing', hidden: true }, 'This queue has no jobs or counters yet.');
    el.adminNote = h('p', { class: 'muted', testid: 'admin-denied', hidden: true },
      'This token may not administer this queue: controls and dead letters are hidden.');
    this.head.replaceChildren(
      h('a', { href: '#/', class: 'back', testid: 'back-link' }, '← All queues'),
      h('div', { class: 'title-row' },
        h('h1', { testid: 'queue-title' }, name), el.badge,
        h('div', { class: 'controls', role: 'group', 'aria-label': 'Queue controls' }, el.pause, el.resume, el.purge)),
      el.missing, el.adminNote,
    );

    el.peekSize = h('span', { class: 'count', testid: 'peek-size' });
    el.peekList = h('ol', { class: 'jobs', testid: 'peek-list' });
    el.peekEmpty = h('p', { class: 'muted', testid: 'peek-empty', hidden: true }, 'No ready jobs.');
    const peekRefresh = h('button', { testid: 'btn-peek-refresh', onclick: () => busy(peekRefresh, () => this.loadPeek()) }, 'Refresh');

    el.deadTotal = h('span', { class: 'count', testid: 'dead-total' });
    el.deadRows = h('tbody');
    el.deadTable = h('table', { class: 'dead stack', testid: 'dead-table' },
      h('thead', {}, h('tr', {}, ...['Job', 'Attempt', 'Failed', 'Last error', 'Body', ''].map((c) => h('th', { scope: 'col' }, c)))),
      el.deadRows);
    el.deadEmpty = h('p', { class: 'muted', testid: 'dead-empty', hidden: true }, 'No dead letters.');
    el.deadPage = h('span', { class: 'muted', testid: 'dead-page' });
    el.deadPrev = h('button', { testid: 'dead-prev', onclick: () => this._page(-1) }, '← Older');
    el.deadNext = h('button', { testid: 'dead-next', onclick: () => this._page(1) }, 'Newer →');
    const deadRefresh = h('button', { testid: 'btn-dead-refresh', onclick: () => busy(deadRefresh, () => this.loadDead()) }, 'Refresh');
    const retryAll = h('button', { testid: 'btn-dead-retry-all', onclick: () => this._retry(retryAll, null) }, 'Retry all');
    const deleteAll = h('button', { class: 'danger', testid: 'btn-dead-delete-all', onclick: () => this._deleteAll(deleteAll) }, 'Delete all…');

    el.events = h('ol', { class: 'events', testid: 'events-list', 'aria-live': 'off' });
    el.eventsNote = h('p', { class: 'muted', testid: 'events-note' }, 'Waiting for job events…');
    const evPause = h('button', { testid: 'btn-events-pause', 'aria-pressed': 'false', onclick: () => {
      this.eventsPaused = !this.eventsPaused;
      evPause.setAttribute('aria-pressed', String(this.eventsPaused));
      evPause.textContent = this.eventsPaused ? 'Resume' : 'Pause';
    } }, 'Pause');
    const evClear = h('button', { testid: 'btn-events-clear', onclick: () => el.events.replaceChildren() }, 'Clear');

    // Peek and events side by side; the dead-letter table, the widest, gets the full width.
    this.body.replaceChildren(
      h('div', { class: 'panels' },
        h('section', { class: 'panel', testid: 'peek-panel', 'aria-labelledby': 'peek-h' },
          h('div', { class: 'panel-head' }, h('h2', { id: 'peek-h' }, 'Next ready jobs ', el.peekSize), peekRefresh),
          el.peekList, el.peekEmpty),
        h('section', { class: 'panel', testid: 'events-panel', 'aria-labelledby': 'ev-h' },
          h('div', { class: 'panel-head' }, h('h2', { id: 'ev-h' }, 'Live job events'), h('div', { class: 'controls' }, evPause, evClear)),
          el.eventsNote, el.events)),
      h('section', { class: 'panel admin', testid: 'dead-panel', 'aria-labelledby': 'dead-h' },
        h('div', { class: 'panel-head' }, h('h2', { id: 'dead-h' }, 'Dead letters ', el.deadTotal),
          h('div', { class: 'controls' }, deadRefresh, retryAll, deleteAll)),
        el.deadTable, el.deadEmpty,
        (el.pager = h('div', { class: 'pager', hidden: true }, el.deadPrev, el.deadPage, el.deadNext))),
    );
    this.applyAdmin();
  }

  async loadPeek() {
    const name = this.name;
    let data;
    try {
      data = await api('GET', `/status/${seg(name)}?with_desc=1`);
    } catch (err) {
      if (name !== this.name) return;
      setText(this.el.peekEmpty, `Could not load: ${err.message}`);
      this.el.peekEmpty.hidden = false;
      return;
    }
    if (name !== this.name) return;
    const jobs = data?.jobs ?? [];
    setNum(this.el.peekSize, data?.size ?? jobs.length, (v) => `(${fmt.count(v)})`);
    this.el.peekList.replaceChildren(...jobs.map((body, i) =>
      h('li', { testid: 'peek-item', dataset: { index: i } }, h('code', {}, fmt.preview(body, 300)))));
    setText(this.el.peekEmpty, 'No ready jobs.');
    this.el.peekEmpty.hidden = jobs.length > 0;
  }

  async loadDead() {
    const name = this.name;
    if (this.ctx.adminDenied(name)) return;
    let data;
    try {
      data = await api('GET', `/dead/${seg(name)}?offset=${this.deadOffset}&limit=${DEAD_PAGE}`);
    } catch (err) {
      if (err.status === 403) {
        this.ctx.denyAdmin(name);
        this.applyAdmin();
      } else if (name === this.name) {
        setText(this.el.deadEmpty, `Could not load: ${err.message}`);
        this.el.deadEmpty.hidden = false;
      }
      return;
    }
    if (name !== this.name) return;
    const jobs = data?.jobs ?? [];
    const total = data?.total ?? jobs.length;
    if (!jobs.length && this.deadOffset > 0 && total > 0) {
      this.deadOffset = Math.max(0, Math.floor((total - 1) / DEAD_PAGE) * DEAD_PAGE);
      return this.loadDead();
    }
    setNum(this.el.deadTotal, total, (v) => `(${fmt.count(v)})`);
    this.el.deadRows.replaceChildren(...jobs.map((job) => this._deadRow(job)));
    setText(this.el.deadEmpty, 'No dead letters.');
    this.el.deadEmpty.hidden = jobs.length > 0;
    this.el.deadTable.hidden = jobs.length === 0;
    this.el.deadPrev.disabled = this.deadOffset === 0;
    this.el.deadNext.disabled = this.deadOffset + jobs.length >= total;
    this.el.pager.hidden = total <= DEAD_PAGE && this.deadOffset === 0;
    setText(this.el.deadPage, total > DEAD_PAGE ? `${this.deadOffset + 1}–${this.deadOffset + jobs.length} of ${total}` : '');
  }

  _deadRow(job) {
    const retry = h('button', { testid: `btn-dead-retry-${job.id}`, onclick: () => this._retry(retry, [job.id]) }, 'Retry');
    const del = h('button', { class: 'danger', testid: `btn-dead-delete-${job.id}`, onclick: () => this._deleteOne(del, job.id) }, 'Delete');
    return h('tr', { testid: `dead-row-${job.id}`, dataset: { job: job.id } },
      h('td', { 'data-label': 'Job', class: 'id' }, h('code', {}, job.id)),
      h('td', { 'data-label': 'Attempt', class: 'num' }, String(job.attempt ?? '–')),
      h('td', { 'data-label': 'Failed', title: job.failed_at ? new Date(job.failed_at * 1000).toISOString() : '' }, fmt.ago(job.failed_at)),
      h('td', { 'data-label': 'Last error', class: 'error' }, job.last_error ?? '–'),
      h('td', { 'data-label': 'Body' }, h('code', {}, fmt.preview(job.body))),
      h('td', { class: 'actions' }, retry, del));
  }

  _page(dir) {
    this.deadOffset = Math.max(0, this.deadOffset + dir * DEAD_PAGE);
    this.loadDead();
  }

  async _control(status) {
    const button = status === 'stop' ? this.el.pause : this.el.resume;
    const ok = await this._admin(button, () => api('POST', `/control/${seg(this.name)}`, { status }));
    if (ok) {
      this.pending = { paused: status === 'stop', until: Date.now() + 5000 };
      notice(status === 'stop' ? `Paused ${this.name}: nothing is delivered until resumed.` : `Resumed ${this.name}.`);
    }
    this._setPaused(ok ? status === 'stop' : !!this.paused);
  }

  async _purge() {
    const name = this.name;
    if (!(await confirmDialog(`Purge every ready and delayed job of “${name}”? This cannot be undone.`, 'Purge'))) return;
    const ok = await this._admin(this.el.purge, () => api('DELETE', `/q/${seg(name)}`).then(() => true));
    if (ok) {
      notice(`Purged ${name}.`);
      this.loadPeek();
    }
  }

  async _retry(button, ids) {
    const res = await this._admin(button, () => api('POST', `/dead/${seg(this.name)}/retry`, ids ? { ids } : {}));
    if (!res) return;
    notice(`Retried ${res.retried ?? 0} job${res.retried === 1 ? '' : 's'}.`);
    this.loadDead();
    this.loadPeek();
  }

  async _deleteOne(button, id) {
    const ok = await this._admin(button, () => api('DELETE', `/dead/${seg(this.name)}/${seg(id)}`).then(() => true));
    if (!ok) return;
    notice(`Deleted job ${id}.`);
    this.loadDead();
  }

  async _deleteAll(button) {
    const name = this.name;
    if (!(await confirmDialog(`Delete every dead letter of “${name}”? This cannot be undone.`, 'Delete all'))) return;
    const ok = await this._admin(button, () => api('DELETE', `/dead/${seg(name)}`).then(() => true));
    if (!ok) return;
    notice(`Deleted the dead letters of ${name}.`);
    this.deadOffset = 0;
    this.loadDead();
  }

  _addEvent(f) {
    if (this.eventsPaused || f.queue !== this.name) return;
    this.el.eventsNote.hidden = true;
    const data = f.data == null ? '' : fmt.preview(f.data, 120);
    const li = h('li', { testid: 'event-item', dataset: { event: f.event, job: f.id } },
      h('time', {}, fmt.time(Date.now() / 1000)),
      h('span', { class: `badge ev-${f.event}` }, f.event),
      h('code', {}, f.id ?? ''),
      data && h('span', { class: 'muted' }, data));
    this.el.events.prepend(li);
    while (this.el.events.childElementCount > MAX_EVENTS) this.el.events.lastElementChild.remove();
  }
}
