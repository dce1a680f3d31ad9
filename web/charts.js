// Throughput and depth over time: a History of points (loaded from /stats/history, then grown
// from the live stats frames) drawn by two uPlot charts (window.uPlot, vendored).

import * as fmt from './format.js';

export const RANGES = { '15m': { step: 1, window: 900 }, '24h': { step: 60, window: 86400 } };
export const TOTAL = '*'; // series key of the totals

/**
 * Points share one time axis. Each point covers `secs` seconds and holds, per key, the number
 * of jobs pushed and processed in it and the ready depth at its end; rates are count / secs.
 */
export class History {
  constructor(range = '15m') {
    this.range = range;
    this.step = RANGES[range].step;
    this.window = RANGES[range].window;
    this.t = [];
    this.secs = [];
    this.keys = new Map(); // key -> {pushed: [], processed: [], ready: []}
    this.prev = null; // last stats frame's counters: {ts, counts: Map(key -> {pushed, processed})}
  }

  /** Replace everything with a /stats/history answer. `now` (unix s) bounds its last point. */
  load(hist, now = Date.now() / 1000) {
    this.t = [];
    this.secs = [];
    this.keys = new Map();
    this.prev = null;
    const step = hist?.step || this.step;
    let n = hist?.totals?.ready?.length ?? hist?.totals?.pushed?.length ?? 0;
    // The newest slots may not be recorded yet: end at the last recorded point, where live frames continue.
    while (n > 0 && hist.totals.ready?.[n - 1] == null) n--;
    for (let i = 0; i < n; i++) {
      const t = hist.start + i * step;
      this.t.push(t);
      this.secs.push(i === n - 1 ? Math.max(1, Math.min(step, now - t)) : step);
    }
    this._loadKey(TOTAL, hist?.totals ?? {}, n);
    for (const [name, series] of Object.entries(hist?.queues ?? {})) this._loadKey(name, series, n);
  }

  _loadKey(key, series, n) {
    const s = this._series(key, 0);
    for (const m of ['pushed', 'processed', 'ready']) {
      const src = series[m] ?? [];
      for (let i = 0; i < n; i++) s[m].push(src[i] ?? null);
    }
  }

  _series(key, fill = this.t.length) {
    let s = this.keys.get(key);
    if (!s) {
      s = { pushed: Array(fill).fill(null), processed: Array(fill).fill(null), ready: Array(fill).fill(null) };
      this.keys.set(key, s);
    }
    return s;
  }

  /**
   * Add one live stats frame: counter deltas since the previous frame and the ready depth (the
   * first frame after a load has no previous one: its point has the depth only).
   */
  addFrame(frame) {
    const ts = frame.ts;
    const counts = new Map([[TOTAL, frame.totals ?? {}], ...Object.entries(frame.queues ?? {})]);
    const prev = this.prev;
    this.prev = { ts, counts };
    if (prev && !(ts > prev.ts)) return false;
    const dt = prev ? ts - prev.ts : 0;
    const last = this.t.length - 1;
    const lastT = this.t[last];
    // Per-second points are the frames themselves; per-minute points gather a minute's frames.
    const bucket = this.step === 1 ? ts : Math.floor(ts / this.step) * this.step;
    let i;
    if (last >= 0 && bucket <= lastT) {
      i = last;
      this.secs[i] += dt;
    } else {
      if (last >= 0 && bucket - lastT > Math.max(5, 3 * this.step)) this._push(lastT + this.step, null); // a gap
      i = this._push(bucket, dt || this.step);
    }
    for (const [key, cur] of counts) {
      const s = this._series(key);
      const was = prev?.counts.get(key);
      for (const m of ['pushed', 'processed']) {
        const d = was && cur[m] != null && was[m] != null ? cur[m] - was[m] : null;
        if (d == null || d < 0) continue; // unknown, or the counter was reset
        s[m][i] = (s[m][i] ?? 0) + d;
      }
      if (cur.ready != null) s.ready[i] = cur.ready;
    }
    this._trim(ts);
    return true;
  }

  _push(t, secs) {
    this.t.push(t);
    this.secs.push(secs);
    for (const s of this.keys.values()) {
      s.pushed.push(null);
      s.processed.push(null);
      s.ready.push(null);
    }
    return this.t.length - 1;
  }

  _trim(now) {
    let k = 0;
    while (k < this.t.length && this.t[k] < now - this.window) k++;
    if (!k) return;
    this.t.splice(0, k);
    this.secs.splice(0, k);
    for (const s of this.keys.values()) for (const a of Object.values(s)) a.splice(0, k);
  }

  /** uPlot data for `key`: [[t], [push/s], [ack/s]] and [[t], [ready]]. */
  data(key) {
    const s = this.keys.get(key);
    const none = this.t.map(() => null);
    if (!s) return { throughput: [this.t, none, none], depth: [this.t, none] };
    const rate = (a) => a.map((v, i) => (v == null || !this.secs[i] ? null : v / this.secs[i]));
    return { throughput: [this.t, rate(s.pushed), rate(s.processed)], depth: [this.t, s.ready] };
  }
}

function clock(t, seconds) {
  const d = new Date(t * 1000);
  const p = (n) => String(n).padStart(2, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}` + (seconds ? `:${p(d.getSeconds())}` : '');
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function chartOptions(kind, width, step, window) {
  const bridge = Math.max(4, 2.5 * step); // seconds
  const axis = { stroke: cssVar('--muted'), grid: { stroke: cssVar('--grid'), width: 1 }, ticks: { show: false } };
  const x = { ...axis, space: step === 1 ? 80 : 60, values: (u, ts) => ts.map((t) => clock(t, step === 1)) };
  const series = (label, color, f) => ({
    label,
    stroke: color,
    width: 2,
    fill: color + '22',
    spanGaps: false,
    // A hole of a point or two (a busy second, the seam between history and live frames) is
    // bridged; longer gaps (a broker restart) show.
    gaps: (u, sidx, idx0, idx1, gaps) => gaps.filter(([a, b]) => u.posToVal(b, 'x') - u.posToVal(a, 'x') > bridge),
    points: { show: false },
    value: (u, v) => (v == null ? '–' : f(v)),
  });
  const time = { label: 'time', value: (u, t) => (t == null ? '–' : clock(t, true)) };
  const y = { ...axis, size: 52, values: (u, vals) => vals.map((v) => (kind === 'throughput' ? fmt.rate(v) : fmt.count(v))) };
  return {
    width,
    height: 180,
    cursor: { drag: { x: false, y: false } },
    scales: {
      // Always show the whole range, the data growing in from the right.
      x: { time: true, range: (u, min, max) => [Math.min(min ?? max, max - window), max] },
      y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] },
    },
    axes: [x, y],
    series:
      kind === 'throughput'
        ? [time, series('push/s', cssVar('--c-push'), fmt.rate), series('ack/s', cssVar('--c-ack'), fmt.rate)]
        : [time, series('ready', cssVar('--c-ready'), fmt.count)],
  };
}

// data-points on a chart's container: how many time points have a value in any series (0 = blank).
function markPoints(el, [, ...series]) {
  let n = 0;
  for (const s of series) n = Math.max(n, s.reduce((c, v) => c + (v != null), 0));
  el.dataset.points = String(n);
}

/** The two charts in `#charts`, showing one key of a History. */
export class Charts {
  constructor(root) {
    this.root = root;
    this.plots = {};
    this.key = TOTAL;
    this.resize = new ResizeObserver(() => this._fit());
    this.resize.observe(root);
  }

  /** (Re)create both charts for `key` from `history`; also after a theme change. */
  show(history, key) {
    this.key = key;
    this.destroy();
    if (!window.uPlot) return;
    const data = history.data(key);
    for (const kind of ['throughput', 'depth']) {
      const el = this.root.querySelector(`[data-testid="chart-${kind}"]`);
      el.replaceChildren();
      this.plots[kind] = new window.uPlot(chartOptions(kind, this._width(el), history.step, history.window), data[kind], el);
      markPoints(el, data[kind]);
    }
  }

  update(history) {
    const data = history.data(this.key);
    for (const [kind, plot] of Object.entries(this.plots)) {
      plot.setData(data[kind]);
      markPoints(this.root.querySelector(`[data-testid="chart-${kind}"]`), data[kind]);
    }
  }

  destroy() {
    for (const plot of Object.values(this.plots)) plot.destroy();
    this.plots = {};
  }

  _width(el) {
    return Math.max(200, el.clientWidth || 300);
  }

  _fit() {
    for (const [kind, plot] of Object.entries(this.plots)) {
      const el = this.root.querySelector(`[data-testid="chart-${kind}"]`);
      const w = this._width(el);
      if (Math.abs(w - plot.width) > 2) plot.setSize({ width: w, height: 180 });
    }
  }
}
