// #/ : the fleet at a glance, from GET /v1/overview every 5 s.

import { h, page, num, bytes, when, badge, every, table, emptyRow, hms, report, kvRows } from './dom.js';
import { api, session, loadOverview } from './api.js';
import { lineChart } from './charts.js';

const HOUR = 3600000;

export async function render({ view, signal }) {
  const tiles = {};
  const tile = (key, label, testid, unit) => {
    tiles[key] = h('span', { 'data-testid': testid, text: '…' });
    return h('div', null, h('dt', { text: label }), h('dd', null, tiles[key], unit ? [' ', h('span', { class: 'unit', text: unit })] : null));
  };
  const stamp = h('p', { class: 'muted' });
  const missing = h('p', { class: 'note', hidden: true, text: 'This gateway does not serve /v1/overview: fleet numbers and charts are not available, storage is shown from /v1/storage.' });
  const rateFig = h('figure', { class: 'chart' });
  const p99Fig = h('figure', { class: 'chart' });
  const storage = h('dl', { class: 'kv' });
  const inst = table([['Instance'], ['Devices connected', 'num']], { 'aria-label': 'Devices connected per instance' });
  const live = h('div');
  const instPanel = h('section', { class: 'panel', 'aria-labelledby': 'ov-in-h' }, h('h2', { id: 'ov-in-h', text: 'Instances' }), inst.wrap);
  view.append(
    page('Overview'), stamp, missing,
    live,
  );
  live.append(h('dl', { class: 'tiles', 'aria-live': 'polite', 'aria-label': 'Fleet now' },
      tile('online', 'Online', 'overview-online'), tile('offline', 'Offline', 'overview-offline'),
      tile('total', 'Devices', 'overview-total'), tile('connections', 'Connections here', 'overview-connections'),
      tile('rate', 'Acked readings', 'overview-rate', 'per s'), tile('p99', 'ACK p99', 'overview-p99', 'ms')),
    h('div', { class: 'cols' },
      h('section', { class: 'panel', 'aria-labelledby': 'ov-rate-h' }, h('h2', { id: 'ov-rate-h', text: 'Readings acknowledged per second, last hour' }), rateFig),
      h('section', { class: 'panel', 'aria-labelledby': 'ov-p99-h' }, h('h2', { id: 'ov-p99-h', text: 'ACK latency p99 (ms), last hour' }), p99Fig)));
  view.append(h('div', { class: 'cols' },
    h('section', { class: 'panel', 'aria-labelledby': 'ov-st-h' }, h('h2', { id: 'ov-st-h', text: 'Storage' }), storage),
    instPanel));

  const set = (key, text) => { if (tiles[key].textContent !== text) tiles[key].textContent = text; };

  function chart(fig, pts, pick, label, end) {
    const points = pts.map((p) => [p.t_ms, pick(p)]);
    const vals = points.map((p) => p[1]).filter((v) => v != null);
    const words = vals.length ? `${label}: latest ${num(vals[vals.length - 1], 1)}, highest ${num(Math.max(...vals), 1)}, over the last hour.` : `${label}: no data yet.`;
    fig.replaceChildren(lineChart({
      series: [{ name: label, cls: 's0', points }], x0: end - HOUR, x1: end, width: fig.clientWidth || 560, label: words,
    }));
  }

  function showStorage(st) {
    if (!st) return;
    const low = st.free_bytes != null && st.min_free_bytes && st.free_bytes < 2 * st.min_free_bytes;
    kvRows(storage, [
      ['Health', st.commits_ok ? badge('commits succeed', 'ok', { 'data-testid': 'storage-health' })
        : [badge('commits failing', 'bad', { 'data-testid': 'storage-health' }), h('span', { class: 'muted', text: ' (store outage, or disk below its floor)' })]],
      ['Backend', st.backend],
      st.free_bytes != null && ['Disk free', [bytes(st.free_bytes), low ? [' ', badge('low', 'warn')] : null,
        st.min_free_bytes ? h('span', { class: 'muted', text: ` (telemetry waits below ${bytes(st.min_free_bytes)})` }) : null]],
      st.used_bytes != null && ['Database', `${bytes(st.used_bytes)}${st.max_bytes ? ` of ${bytes(st.max_bytes)} cap` : ' (no cap)'}`],
      ['Retention', st.retention === '0' ? 'kept forever' : st.retention],
      st.chunks != null && ['Chunks', `${num(st.chunks)}${st.chunk_span ? ` of ${st.chunk_span}` : ''}`],
      st.oldest_chunk_opened_ms != null && ['Oldest chunk', when(st.oldest_chunk_opened_ms)],
      st.unsealed_rows != null && ['Not yet indexed', `${num(st.unsealed_rows)} readings`],
    ]);
  }

  function show(o) {
    if (!o) return;
    const d = o.devices || {};
    set('online', num(d.online)); set('offline', num(d.offline)); set('total', num(d.total)); set('connections', num(o.connections));
    const pts = Array.isArray(o.series?.points) ? o.series.points : [];
    const last = pts[pts.length - 1] || o.series?.current;
    set('rate', last ? num(last.acked_per_s, last.acked_per_s < 100 ? 1 : 0) : '—');
    set('p99', last?.ack_p99_ms != null ? num(last.ack_p99_ms, 2) : '—');
    const end = o.now_ms || Date.now();
    stamp.textContent = `Instance ${o.instance ?? '?'}${d.revoked != null ? ` · ${num(d.revoked)} revoked devices` : ''} · updated ${hms(end, true)}`;
    // The step under way too, once it is a few seconds long: a fleet that
    // just started shows on the charts before the first 10 s point.
    const cur = o.series?.current;
    const drawn = cur && (!pts.length || cur.t_ms - pts[pts.length - 1].t_ms >= 3000) ? pts.concat([cur]) : pts;
    chart(rateFig, drawn, (p) => p.acked_per_s, 'Readings acknowledged per second', end);
    chart(p99Fig, drawn, (p) => p.ack_p99_ms, 'ACK p99 in ms', end);
    showStorage(o.storage);
    const list = Array.isArray(o.instances) ? o.instances : [];
    inst.tbody.replaceChildren(...(list.length ? list.map((i) => h('tr', null,
      h('th', { scope: 'row' }, i.instance, i.instance === o.instance ? h('span', { class: 'muted', text: ' (this one)' }) : null),
      h('td', { class: 'num', text: num(i.devices) }))) : [emptyRow(2, 'No instance reported.')]));
  }

  async function tick() {
    if (session.hasOverview) {
      const fresh = session.overview && Date.now() - session.overviewAt < 3000;
      const o = fresh ? session.overview : await loadOverview(signal);
      if (o) { missing.hidden = true; live.hidden = instPanel.hidden = false; show(o); return; }
    }
    missing.hidden = false;
    live.hidden = instPanel.hidden = true;
    showStorage(await api('/v1/storage', { signal }));
  }
  try { await tick(); } catch (e) { report(e, 'Cannot load the overview'); }
  every(5000, tick, signal, 'Cannot refresh the overview');
}
