// #/jobs (newest first, paged) and #/jobs/<id> (progress, devices paged,
// cancel). Both refresh while a job runs.

import { h, page, num, when, stateBadge, json, every, table, emptyRow, announce, report, confirmDialog, field, kvRows } from './dom.js';
import { api, path, can } from './api.js';
import { progress } from './charts.js';
import { deviceLink } from './devices.js';

const STATES = ['queued', 'in_progress', 'succeeded', 'failed', 'timed_out', 'cancelled'];

export function opText(op = {}) {
  if (op.command) return `command ${op.command.name}`;
  if (op.desired) return 'desired-state patch';
  if (op.firmware) return `firmware ${op.firmware.version ?? op.firmware.image}`;
  return json(op);
}
function targetText(t = {}) {
  if (t.tags) return `tags ${Object.entries(t.tags).map(([k, v]) => `${k}:${v}`).join(' ') || '(none)'}`;
  if (Array.isArray(t.devices)) return `${num(t.devices.length)} listed device${t.devices.length === 1 ? '' : 's'}`;
  return json(t);
}
/** Rebuilds rows, keeping keyboard focus on the same link. */
function refill(tbody, rows) {
  const a = document.activeElement;
  const href = tbody.contains(a) ? a.getAttribute('href') : null;
  tbody.replaceChildren(...rows);
  if (href) [...tbody.querySelectorAll('a')].find((x) => x.getAttribute('href') === href)?.focus();
}
function pager(load, testid = 'next-page') {
  const p = { stack: [], cur: null, next: null };
  const b = (text, id, f) => h('button', { type: 'button', class: 'btn small', text, 'data-testid': id, onclick: f });
  p.first = b('First page', 'first-page', () => { p.stack = []; p.cur = null; load(); });
  p.nextBtn = b('Next page', testid, () => { p.stack.push(p.cur); p.cur = p.next; load(); });
  p.el = h('div', { class: 'pager' }, p.first, p.nextBtn);
  p.set = (next) => { p.next = next ?? null; p.nextBtn.disabled = p.next == null; p.first.disabled = !p.stack.length; };
  return p;
}

export async function renderList({ view, signal }) {
  const t = table([['Job'], ['Status'], ['Operation'], ['Target'], ['Progress'], ['Created']], { 'aria-label': 'Jobs, newest first', 'data-testid': 'jobs-table' });
  const pg = pager(() => load().catch((e) => report(e, 'Cannot list the jobs')));
  view.append(page('Jobs'), t.wrap, pg.el);
  async function load() {
    const r = await api(path(['jobs'], { before: pg.cur, limit: 25 }), { signal });
    const jobs = r.jobs || [];
    refill(t.tbody, jobs.length ? jobs.map((j) => h('tr', { 'data-testid': 'job-row', 'data-job-id': j.job_id, 'data-status': j.status },
      h('th', { scope: 'row' }, h('a', { href: `#/jobs/${encodeURIComponent(j.job_id)}`, text: `#${j.job_id}` })),
      h('td', null, stateBadge(j.status)),
      h('td', { text: opText(j.operation) }),
      h('td', { text: targetText(j.target) }),
      h('td', null, progress(j.counts, j.total)),
      h('td', null, when(j.created_ms), h('div', { class: 'muted', text: `by ${j.created_by ?? '?'}` })))) : [emptyRow(6, 'No jobs.')]);
    pg.set(r.next_before);
  }
  try { await load(); } catch (e) { report(e, 'Cannot list the jobs'); }
  every(5000, async () => { if (pg.cur == null) await load(); }, signal, 'Cannot refresh the jobs');
}

export async function renderJob({ view, signal, params: [id] }) {
  const h1 = page(`Job #${id}`);
  const status = h('span', { 'aria-live': 'polite' });
  const cancelBtn = h('button', { type: 'button', class: 'btn danger', text: 'Cancel job', 'data-testid': 'cancel-button', onclick: cancel, hidden: true });
  const kv = h('dl', { class: 'kv' });
  const bar = h('div');
  const counts = table([['State'], ['Devices', 'num']], { 'aria-label': 'Devices by state' });
  const filter = h('select', { id: 'job-state' }, h('option', { value: '', text: 'All' }), STATES.map((x) => h('option', { value: x, text: x.replace('_', ' ') })));
  const dt = table([['Device'], ['State'], ['Started'], ['Finished'], ['Command', 'num']], { 'aria-label': 'The job\'s devices', 'data-testid': 'job-devices-table' });
  const pg = pager(() => loadDevices().catch((e) => report(e, 'Cannot list the job\'s devices')));
  filter.addEventListener('change', () => { pg.stack = []; pg.cur = null; loadDevices().catch((e) => report(e, 'Cannot list the job\'s devices')); });
  view.append(h('p', null, h('a', { href: '#/jobs', text: '← All jobs' })),
    h('div', { class: 'head' }, h1, status, can('operate') ? h('div', { class: 'actions' }, cancelBtn) : null),
    h('div', { class: 'cols' },
      h('section', { class: 'panel', 'aria-labelledby': 'j-d' }, h('h2', { id: 'j-d', text: 'Job' }), kv),
      h('section', { class: 'panel', 'aria-labelledby': 'j-p' }, h('h2', { id: 'j-p', text: 'Progress' }), bar, counts.wrap)),
    h('section', { class: 'panel', 'aria-labelledby': 'j-v' }, h('h2', { id: 'j-v', text: 'Devices' }),
      h('div', { class: 'row' }, field('Show devices', filter)), dt.wrap, pg.el));

  let job = null;
  async function loadJob() {
    job = await api(path(['jobs', id]), { signal });
    const st = stateBadge(job.status, { 'data-testid': 'job-status' });
    if (status.textContent !== st.textContent) status.replaceChildren(st);
    cancelBtn.hidden = job.status !== 'running';
    const a = job.abort;
    kvRows(kv, [
      ['Operation', opText(job.operation)],
      ['Details', h('pre', { class: 'json', tabindex: '0', text: json(job.operation, true) })],
      ['Target', targetText(job.target)],
      ['Pace', job.rate_per_minute ? `${num(job.rate_per_minute)} devices per minute` : 'all at once'],
      ['Abort rule', a ? `over ${num(a.failed_pct, 2)} % of at least ${num(a.min_completed)} completed devices fail` : 'none'],
      ['Device timeout', `${num(job.device_timeout_s)} s`],
      ['Deadline', when(job.deadline_ms)],
      ['Created', [when(job.created_ms), ` by ${job.created_by ?? '?'}`]],
      ['Updated', when(job.updated_ms)],
      ['Finished', when(job.finished_ms)],
      job.reason && ['Why it stopped', job.reason],
    ]);
    bar.replaceChildren(progress(job.counts, job.total), h('p', { class: 'muted', text: `${num(job.started)} of ${num(job.total)} devices started.` }));
    counts.tbody.replaceChildren(...STATES.map((x) => h('tr', null, h('th', { scope: 'row', text: x.replace('_', ' ') }), h('td', { class: 'num', text: num(job.counts?.[x]) }))));
  }
  async function loadDevices() {
    const r = await api(path(['jobs', id, 'devices'], { state: filter.value, after: pg.cur, limit: 50 }), { signal });
    const list = r.devices || [];
    refill(dt.tbody, list.length ? list.map((d) => h('tr', { 'data-testid': 'job-device-row', 'data-device-id': d.device_id, 'data-status': d.state },
      h('th', { scope: 'row' }, deviceLink(d.device_id)),
      h('td', null, stateBadge(d.state)),
      h('td', null, when(d.started_ms)),
      h('td', null, when(d.finished_ms)),
      h('td', { class: 'num', text: d.command_id ?? '—' }))) : [emptyRow(5, 'No devices here.')]);
    pg.set(list.length ? r.next : null);
  }
  async function cancel() {
    if (!await confirmDialog({ title: `Cancel job #${id}?`, body: 'Nothing more starts; devices its operation has not reached yet are cancelled. This cannot be undone.', yes: 'Cancel job' })) return;
    try {
      const j = await api(path(['jobs', id, 'cancel']), { method: 'POST' });
      announce(`Job #${id} is ${j?.status ?? 'cancelled'}.`, 'ok');
      await loadJob();
      h1.focus();
      await loadDevices();
    } catch (e) { report(e, 'Cannot cancel the job'); }
  }
  try {
    await loadJob();
  } catch (e) {
    if (e.status === 404) { view.append(h('p', { class: 'panel', text: `No job #${id}.` })); return; }
    report(e, 'Cannot load the job');
  }
  await loadDevices().catch((e) => report(e, 'Cannot list the job\'s devices'));
  every(() => (job?.status === 'running' ? 3000 : 15000), async () => { await loadJob(); await loadDevices(); }, signal, 'Cannot refresh the job');
}
