// Small SVG charts drawn from data: line charts and a stacked progress bar.
// Only SVG attributes (no inline styles); colours come from classes.

import { s, h, hms, num } from './dom.js';

const compact = new Intl.NumberFormat('en-US', { notation: 'compact', maximumFractionDigits: 1 });

function ticks(lo, hi, n) {
  const step0 = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const f = step0 / mag;
  const step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
  const out = [];
  for (let v = Math.floor(lo / step) * step; v <= Math.ceil(hi / step) * step + step / 2; v += step) out.push(Number(v.toFixed(10)));
  return out;
}

/**
 * A line chart. series: [{name, cls ('s0'..'s7'), points: [[x_ms, y|null], ...]}];
 * null y values leave gaps. x0/x1 fix the time range (else the data's).
 */
export function lineChart({ series, x0, x1, width = 600, height = 170, label, zero = true, testid }) {
  const W = Math.max(260, Math.round(width)), H = height;
  const m = { l: 46, r: 10, t: 8, b: 22 };
  let lo = Infinity, hi = -Infinity, xl = x0 ?? Infinity, xh = x1 ?? -Infinity;
  for (const sr of series) {
    for (const [x, y] of sr.points) {
      if (x0 == null) { xl = Math.min(xl, x); xh = Math.max(xh, x); }
      if (y == null || !Number.isFinite(y)) continue;
      lo = Math.min(lo, y); hi = Math.max(hi, y);
    }
  }
  if (lo === Infinity) { lo = 0; hi = 1; }
  if (zero && lo > 0) lo = 0;
  if (zero && hi < 0) hi = 0;
  if (hi - lo < 1e-9) { hi += Math.abs(hi) * 0.1 || 1; lo -= zero && lo === 0 ? 0 : Math.abs(lo) * 0.1 || 1; }
  if (!Number.isFinite(xl) || xh <= xl) { xh = (Number.isFinite(xh) ? xh : Date.now()); xl = xh - 60000; }
  const ys = ticks(lo, hi, 4);
  lo = ys[0]; hi = ys[ys.length - 1];
  const X = (x) => (m.l + ((x - xl) / (xh - xl)) * (W - m.l - m.r)).toFixed(1);
  const Y = (y) => (H - m.b - ((y - lo) / (hi - lo)) * (H - m.t - m.b)).toFixed(1);
  const svg = s('svg', {
    class: 'chart-svg', viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': label, 'data-testid': testid,
  });
  for (const y of ys) {
    svg.append(s('line', { class: 'grid', x1: m.l, x2: W - m.r, y1: Y(y), y2: Y(y) }),
      s('text', { x: m.l - 5, y: Number(Y(y)) + 4, 'text-anchor': 'end', text: compact.format(y) }));
  }
  const secs = xh - xl < 600000;
  for (let i = 0; i <= 4; i++) {
    const x = xl + ((xh - xl) * i) / 4;
    svg.append(s('text', { x: X(x), y: H - 6, 'text-anchor': i === 0 ? 'start' : i === 4 ? 'end' : 'middle', text: hms(x, secs) }));
  }
  svg.append(s('line', { class: 'axis', x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
  for (const sr of series) {
    let d = '', pen = false, run = 0, last = null;
    const lone = [];
    for (const [x, y] of sr.points) {
      if (y == null || !Number.isFinite(y)) { if (run === 1) lone.push(last); pen = false; run = 0; continue; }
      d += `${pen ? 'L' : 'M'}${X(x)} ${Y(y)}`;
      pen = true; run++; last = [x, y];
    }
    if (run === 1) lone.push(last);
    if (d) svg.append(s('path', { class: `line ${sr.cls}`, d }, s('title', { text: sr.name })));
    for (const [x, y] of lone) svg.append(s('circle', { class: `dot ${sr.cls}`, cx: X(x), cy: Y(y), r: 2.5 }));
  }
  return svg;
}

/** A job's progress: a stacked bar (succeeded, failed or timed out, cancelled, in progress) and its words. */
export function progress(counts = {}, total = 0) {
  const c = (k) => Number(counts[k]) || 0;
  const parts = [['ok', c('succeeded')], ['bad', c('failed') + c('timed_out')], ['idle', c('cancelled')], ['busy', c('in_progress')]];
  const done = c('succeeded') + c('failed') + c('timed_out') + c('cancelled');
  const words = `${num(done)} of ${num(total)} done: ${num(c('succeeded'))} succeeded, ${num(c('failed'))} failed, `
    + `${num(c('timed_out'))} timed out, ${num(c('cancelled'))} cancelled, ${num(c('in_progress'))} in progress, ${num(c('queued'))} queued`;
  const bar = s('svg', { class: 'bar', role: 'img', 'aria-label': words, preserveAspectRatio: 'none' });
  let x = 0;
  for (const [cls, n] of parts) {
    if (!n || !total) continue;
    const w = (n / total) * 100;
    bar.append(s('rect', { class: cls, x: `${x}%`, y: 0, width: `${w}%`, height: '100%' }));
    x += w;
  }
  return h('div', { class: 'progress' }, bar, h('span', { class: 'muted', 'aria-hidden': 'true', text: `${num(done)} / ${num(total)} done` }));
}
