// #/devices/<id> : one device: status, tags, telemetry (chart and table),
// commands, desired and reported state, revoke and token rotation.
// Status, telemetry and state refresh every 5 s; commands every 2 s while
// one is not final.

import {
  h, page, num, when, ymd, badge, stateBadge, json, payloadText, every, table, emptyRow, field, invalid,
  announce, report, confirmDialog, kvRows, debounce,
} from './dom.js';
import { api, path, can } from './api.js';
import { lineChart } from './charts.js';

const FINAL = new Set(['succeeded', 'failed', 'expired', 'cancelled']);
const MAX = 200; // readings shown
const isObj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const clip = (t, n = 400) => (t.length > n ? `${t.slice(0, n)}…` : t);
const setText = (el, t) => { if (el.textContent !== t) el.textContent = t; };

/** The JSON merge patch (RFC 7396) that turns a into b. */
export function mergeDiff(a, b) {
  const p = Object.create(null);
  for (const k of Object.keys(a)) if (!Object.hasOwn(b, k)) p[k] = null;
  for (const [k, v] of Object.entries(b)) {
    if (Object.hasOwn(a, k) && json(a[k]) === json(v)) continue;
    p[k] = isObj(a[k]) && isObj(v) ? mergeDiff(a[k], v) : v;
  }
  return p;
}

export async function render({ view, signal, params: [id] }) {
  const dp = (rest = [], q) => path(['devices', id, ...rest], q);
  const admin = can('admin'), operate = can('operate');
  const sec = (key, title, ...kids) => h('section', { class: 'panel', 'aria-labelledby': `d-${key}` }, h('h2', { id: `d-${key}`, text: title }), kids);

  // ---- skeleton: the heading first, so navigation can focus it ----
  const status = h('span', { class: 'badge', 'data-testid': 'device-status', text: '…' });
  const revokedBadge = badge('revoked', 'bad');
  revokedBadge.hidden = true;
  const rotateBtn = h('button', { type: 'button', class: 'btn', 'data-testid': 'rotate-button', text: 'Rotate token', onclick: rotate });
  const revokeBtn = h('button', { type: 'button', class: 'btn danger', 'data-testid': 'revoke-button', text: 'Revoke', onclick: revoke });
  rotateBtn.disabled = revokeBtn.disabled = !admin;
  const h1 = page(id);
  view.append(h('p', null, h('a', { href: '#/devices', text: '← All devices' })),
    h('div', { class: 'head' }, h1, h('span', { 'aria-live': 'polite' }, status), revokedBadge,
      operate ? h('div', { class: 'actions' }, rotateBtn, revokeBtn) : null),
    ...[operate && !admin && h('p', { class: 'note', text: 'Your token cannot revoke, rotate tokens or edit tags: that needs the admin role.' })].filter(Boolean));
  const tokenPanel = h('section', { class: 'panel', 'aria-labelledby': 'd-tok', hidden: true });
  const kv = h('dl', { class: 'kv' });
  const tagList = h('div', { class: 'tags', 'data-testid': 'device-tags' });
  const tk = h('input', { id: 'tag-key', autocomplete: 'off', spellcheck: 'false', 'data-testid': 'tag-key' });
  const tv = h('input', { id: 'tag-value', autocomplete: 'off', spellcheck: 'false', 'data-testid': 'tag-value' });
  const tagForm = admin ? h('form', { class: 'row', onsubmit: addTag, novalidate: true },
    field('Tag key', tk), field('Value', tv), h('button', { type: 'submit', class: 'btn', text: 'Set tag', 'data-testid': 'tag-save' })) : null;

  const legend = h('fieldset', { class: 'legend', hidden: true });
  const fig = h('figure', { class: 'chart' });
  const tInfo = h('p', { class: 'muted' });
  const tt = table([['Seq', 'num'], ['Time'], ['Payload']], { 'data-testid': 'telemetry-table', 'aria-label': 'Recent readings, newest first' }, 'tall');

  const cname = h('input', { id: 'cmd-name', autocomplete: 'off', spellcheck: 'false', maxlength: 255, 'data-testid': 'command-name' });
  const cpay = h('textarea', { id: 'cmd-payload', rows: 3, spellcheck: 'false', placeholder: '{"delay_s": 5}', 'data-testid': 'command-payload' });
  const cttl = h('input', { id: 'cmd-ttl', type: 'number', min: 1, max: 2592000, inputmode: 'numeric', placeholder: '3600' });
  const csend = h('button', { type: 'submit', class: 'btn primary', text: 'Send command', 'data-testid': 'command-send' });
  const cform = operate ? h('form', { onsubmit: send, novalidate: true },
    h('div', { class: 'row' }, h('div', { class: 'grow' }, field('Command name', cname)), field('Time to live, s (optional)', cttl)),
    field('Payload, JSON (optional)', cpay), csend) : null;
  const ct = table([['Id', 'num'], ['Name'], ['State'], ['Created'], ['Updated'], ['Payload'], ['Result']],
    { 'aria-label': 'Recent commands, newest first', 'data-testid': 'command-table' });

  const pre = (testid) => h('pre', { class: 'json', 'data-testid': testid, tabindex: '0' });
  const desiredPre = pre('state-desired'), reportedPre = pre('state-reported'), deltaPre = pre('state-delta');
  const desiredMeta = h('p', { class: 'muted' }), reportedMeta = h('p', { class: 'muted' }), deltaMeta = h('p', { class: 'muted' });
  const editor = h('textarea', { id: 'desired-edit', rows: 8, spellcheck: 'false', 'data-testid': 'desired-editor' });
  const saveBtn = h('button', { type: 'submit', class: 'btn primary', text: 'Save desired state', 'data-testid': 'desired-save' });
  const editForm = operate ? h('form', { onsubmit: saveDesired, novalidate: true },
    field('Edit the desired document (JSON)', editor, 'Saved as a merge patch of what you changed (a member removed here is removed there). If someone else saves first, nothing is overwritten: you are told and can save again.'),
    h('div', { class: 'actions' }, saveBtn, h('button', { type: 'button', class: 'btn', text: 'Discard edits', onclick: () => fillEditor(true) }))) : null;

  const body = h('div', { hidden: true },
    tokenPanel,
    h('div', { class: 'cols' }, sec('st', 'Status', kv), sec('tags', 'Tags', tagList, tagForm)),
    sec('tel', 'Telemetry', legend, fig, tInfo, tt.wrap),
    sec('cmd', 'Commands', cform, h('h3', { text: 'Recent commands' }), ct.wrap),
    sec('state', 'State',
      h('div', { class: 'cols' },
        h('div', null, h('h3', { text: 'Desired (set by operators)' }), desiredMeta, desiredPre),
        h('div', null, h('h3', { text: 'Reported (sent by the device)' }), reportedMeta, reportedPre)),
      h('h3', { text: 'Delta: desired members the device has not matched yet' }), deltaMeta, deltaPre, editForm));
  view.append(body);

  // ---- status ----
  let dev = null;
  async function loadDevice() {
    dev = await api(dp(), { signal });
    setText(status, dev.online ? 'online' : 'offline');
    status.className = `badge ${dev.online ? 'ok' : ''}`;
    status.dataset.online = String(Boolean(dev.online));
    revokedBadge.hidden = !dev.revoked_ms;
    rotateBtn.hidden = revokeBtn.hidden = Boolean(dev.revoked_ms);
    kvRows(kv, [
      ['Instance', dev.instance || '—'],
      ['Peer', dev.peer ? h('span', { class: 'mono', text: dev.peer }) : '—'],
      ['Connected since', when(dev.connected_since_ms)],
      ['Last seen', when(dev.last_seen_ms)],
      ['Last seq', num(dev.last_seq)],
      ['Created', when(dev.created_ms)],
      ['Revoked', dev.revoked_ms ? when(dev.revoked_ms) : 'no'],
    ]);
    renderTags(dev.tags);
  }

  // ---- tags ----
  let tagsKey = null;
  function renderTags(tags) {
    const list = Object.entries(tags || {});
    const key = json(list);
    if (key === tagsKey) return;
    tagsKey = key;
    tagList.replaceChildren(...(list.length ? list.map(([k, v]) => h('span', { class: 'tag' }, `${k}:${v}`,
      admin ? h('button', { type: 'button', class: 'btn small quiet', 'aria-label': `Remove tag ${k}`, text: '×', onclick: () => patchTags({ [k]: null }, `Tag ${k} removed.`) }) : null))
      : [h('span', { class: 'muted', text: 'No tags.' })]));
  }
  async function patchTags(patch, done) {
    try {
      const r = await api(dp(['tags']), { method: 'PATCH', body: patch, type: 'application/merge-patch+json' });
      renderTags(r.tags);
      announce(done, 'ok');
      return true;
    } catch (e) { report(e, 'Cannot change the tags'); return false; }
  }
  async function addTag(e) {
    e.preventDefault();
    const k = tk.value.trim(), v = tv.value.trim();
    invalid(tk, k ? '' : 'Give the tag a key.');
    invalid(tv, v ? '' : 'Give the tag a value.');
    if (!k || !v) { (k ? tv : tk).focus(); return; }
    if (await patchTags({ [k]: v }, `Tag ${k}:${v} set.`)) { tk.value = tv.value = ''; tk.focus(); }
  }

  // ---- telemetry: the last MAX readings, fetched by seq, then only what is new ----
  let readings = [], fieldsKey = null;
  const hiddenFields = new Set();
  async function loadTelemetry() {
    const last = dev?.last_seq || 0;
    const have = readings.length ? readings[readings.length - 1].seq : 0;
    if (fieldsKey !== null && (!last || last <= have)) return;
    if (last) {
      const full = !have || last - have > MAX;
      const pg = await api(dp(['telemetry'], { from_seq: full ? Math.max(1, last - MAX + 1) : have + 1, limit: MAX }), { signal });
      readings = (full ? [] : readings).concat(pg.readings || []).slice(-MAX);
    }
    drawTelemetry();
  }
  function drawTelemetry() {
    const fields = [];
    for (const r of readings) {
      if (r.content_type !== 'json' || !isObj(r.payload)) continue;
      for (const [k, v] of Object.entries(r.payload)) {
        if (typeof v === 'number' && Number.isFinite(v) && !fields.includes(k) && fields.length < 8) fields.push(k);
      }
    }
    const key = json(fields);
    if (key !== fieldsKey) {
      fieldsKey = key;
      legend.replaceChildren(h('legend', { text: 'Lines (numeric fields of the JSON payloads)' }), ...fields.map((f, i) => h('label', { class: 'check' },
        h('input', { type: 'checkbox', checked: !hiddenFields.has(f), onchange: (e) => { if (e.target.checked) hiddenFields.delete(f); else hiddenFields.add(f); drawChart(fields); } }),
        h('span', { class: `sw s${i}`, 'aria-hidden': 'true' }), f)));
      legend.hidden = !fields.length;
    }
    drawChart(fields);
    tInfo.textContent = readings.length
      ? `The ${num(readings.length)} most recent readings (seq ${num(readings[0].seq)} to ${num(readings[readings.length - 1].seq)}), newest first.`
      : 'No readings stored.';
    tt.tbody.replaceChildren(...(readings.length ? readings.slice().reverse().map((r) => h('tr', null,
      h('th', { scope: 'row', class: 'num', text: num(r.seq) }),
      h('td', null, when(r.timestamp_ms)),
      h('td', { class: 'payload', text: clip(payloadText(r.payload, r.content_type)) }))) : [emptyRow(3, 'No readings.')]));
  }
  function drawChart(fields) {
    if (!fields.length) {
      fig.replaceChildren(h('p', { class: 'muted', text: readings.length ? 'No numeric JSON fields to draw: the readings are in the table.' : 'No readings yet.' }));
      return;
    }
    const sorted = readings.slice().sort((a, b) => a.timestamp_ms - b.timestamp_ms);
    const series = fields.map((f, i) => ({
      name: f, cls: `s${i}`,
      points: sorted.map((r) => [r.timestamp_ms, isObj(r.payload) && typeof r.payload[f] === 'number' ? r.payload[f] : null]),
    })).filter((sr) => !hiddenFields.has(sr.name));
    fig.replaceChildren(lineChart({
      series, width: fig.clientWidth || 640, height: 220, zero: false, testid: 'telemetry-chart',
      label: `Telemetry chart: ${series.map((x) => x.name).join(', ') || 'no line selected'}, ${num(sorted.length)} readings from ${ymd(sorted[0].timestamp_ms)} to ${ymd(sorted[sorted.length - 1].timestamp_ms)}. The table below lists them.`,
    }));
  }

  // ---- commands ----
  let cmds = [];
  const watched = new Set();
  const pending = () => cmds.some((c) => !FINAL.has(c.state));
  async function loadCommands() {
    const pg = await api(dp(['commands'], { limit: 20 }), { signal });
    cmds = pg.commands || [];
    for (const c of cmds) {
      if (watched.has(c.command_id) && FINAL.has(c.state)) {
        watched.delete(c.command_id);
        announce(`Command ${c.name} (#${c.command_id}): ${c.state}.`, c.state === 'succeeded' ? 'ok' : 'error');
      }
    }
    renderCommands();
  }
  function renderCommands() {
    ct.tbody.replaceChildren(...(cmds.length ? cmds.map((c) => h('tr', { 'data-testid': 'command-row', 'data-status': c.state, 'data-command-id': c.command_id },
      h('td', { class: 'num', text: num(c.command_id) }),
      h('th', { scope: 'row', text: c.name }),
      h('td', null, stateBadge(c.state)),
      h('td', null, when(c.created_ms)),
      h('td', null, when(c.updated_ms)),
      h('td', { class: 'payload', text: clip(payloadText(c.payload, c.content_type), 200) }),
      h('td', { class: 'payload', text: c.result ? clip(`${c.result.status}: ${payloadText(c.result.payload, c.result.content_type)}`, 200) : '—' })))
      : [emptyRow(7, 'No commands.')]));
  }
  let armCommands = () => {};
  async function send(e) {
    e.preventDefault();
    const name = cname.value.trim(), raw = cpay.value.trim(), ttlRaw = cttl.value.trim();
    let payload, ok = true;
    invalid(cname, name ? '' : 'Give the command a name.');
    ok = Boolean(name);
    if (raw) {
      try { payload = JSON.parse(raw); invalid(cpay, ''); } catch (err) { invalid(cpay, `Not valid JSON: ${err.message}`); ok = false; }
    } else invalid(cpay, '');
    const ttl = Number(ttlRaw);
    const ttlOk = !ttlRaw || (Number.isInteger(ttl) && ttl >= 1 && ttl <= 2592000);
    invalid(cttl, ttlOk ? '' : '1 to 2,592,000 seconds.');
    if (!ok || !ttlOk) { cform.querySelector('[aria-invalid="true"]')?.focus(); return; }
    const req = { name };
    if (raw) req.payload = payload;
    if (ttlRaw) req.ttl_s = ttl;
    csend.disabled = true;
    try {
      const c = await api(dp(['commands']), { method: 'POST', body: req });
      watched.add(c.command_id);
      cmds = [c, ...cmds.filter((x) => x.command_id !== c.command_id)].slice(0, 20);
      renderCommands();
      announce(`Command ${c.name} queued (#${c.command_id}).`, 'ok');
      armCommands(1000);
    } catch (err) { report(err, 'Cannot send the command'); } finally { csend.disabled = false; }
  }

  // ---- state ----
  let state = null, etag = null, filled = null;
  async function loadState() {
    const { data, res } = await api(dp(['state']), { signal, full: true });
    state = data;
    etag = res.headers.get('ETag');
    renderState();
  }
  function renderState() {
    const d = state?.desired || {}, r = state?.reported || {}, delta = state?.delta || {};
    setText(desiredMeta, `Version ${num(d.version)}${d.updated_ms ? `, changed ${ymd(d.updated_ms)}` : ''}; the device confirmed version ${num(state?.desired_acked_version)}.`);
    setText(reportedMeta, `Version ${num(r.version)}${r.updated_ms ? `, changed ${ymd(r.updated_ms)}` : ', never reported'}.`);
    setText(desiredPre, json(d.document ?? {}, true));
    setText(reportedPre, json(r.document ?? {}, true));
    const inSync = !isObj(delta) || !Object.keys(delta).length;
    setText(deltaMeta, inSync ? 'None: the reported state matches the desired one.' : 'Waiting for the device to match:');
    deltaPre.hidden = inSync;
    setText(deltaPre, json(delta, true));
    fillEditor(false);
  }
  function fillEditor(force) {
    if (!editForm || !state) return;
    const text = json(state.desired?.document ?? {}, true);
    if (force || filled === null || editor.value === filled) { editor.value = text; filled = text; invalid(editor, ''); }
  }
  async function saveDesired(e) {
    e.preventDefault();
    let doc;
    try { doc = JSON.parse(editor.value); } catch (err) { invalid(editor, `Not valid JSON: ${err.message}`); editor.focus(); return; }
    if (!isObj(doc)) { invalid(editor, 'The desired state is a JSON object: {...}.'); editor.focus(); return; }
    invalid(editor, '');
    const patch = mergeDiff(state?.desired?.document || {}, doc);
    if (!Object.keys(patch).length) { announce('Nothing to save: the desired state is as shown.'); return; }
    saveBtn.disabled = true;
    try {
      const { data, res } = await api(dp(['state', 'desired']), {
        method: 'PATCH', body: patch, type: 'application/merge-patch+json', headers: etag ? { 'If-Match': etag } : {}, full: true,
      });
      state = data;
      etag = res.headers.get('ETag') || etag;
      fillEditor(true);
      renderState();
      announce(`Desired state saved: version ${num(data?.desired?.version)}.`, 'ok');
    } catch (err) {
      if (err.status === 412) {
        try { await loadState(); } catch { /* reported below */ }
        announce('Someone changed the desired state first: nothing was overwritten. The new version is shown above; your edit is still in the box, save again to apply it.', 'error');
      } else report(err, 'Cannot save the desired state');
    } finally { saveBtn.disabled = false; }
  }

  // ---- revoke and rotate ----
  async function revoke() {
    const yes = await confirmDialog({
      title: `Revoke ${id}?`,
      body: 'The device is disconnected now and can never connect again; its open commands are cancelled. This cannot be undone.',
      yes: 'Revoke device',
    });
    if (!yes) return;
    try {
      const r = await api(dp(['revoke']), { method: 'POST' });
      announce(r?.revoked === false ? `${id} was revoked already.` : `${id} is revoked${r?.disconnected ? ' and was disconnected' : ''}.`, 'ok');
      await loadDevice();
      h1.focus();
    } catch (e) { report(e, 'Cannot revoke the device'); }
  }
  async function rotate() {
    const deliver = h('input', { type: 'checkbox', id: 'rot-deliver' });
    const grace = h('input', { type: 'number', id: 'rot-grace', min: 0, max: 31536000, inputmode: 'numeric', placeholder: '604800 (7 days)' });
    const extra = h('div', null,
      h('div', { class: 'field' }, h('label', { class: 'check', for: 'rot-deliver' }, deliver, 'Also send the new token to the device (a furrow.token command)')),
      field('Grace period for the old token, seconds (optional)', grace));
    const yes = await confirmDialog({
      title: `Rotate the token of ${id}?`,
      body: 'A new token is made and shown once. The old one keeps working for the grace period, or until the device first uses the new one.',
      yes: 'Rotate token', danger: false, extra,
    });
    if (!yes) return;
    const req = {};
    if (deliver.checked) req.deliver = true;
    if (grace.value.trim() !== '') req.grace_s = Number(grace.value);
    try {
      const r = await api(dp(['token']), { method: 'POST', body: req });
      showToken(r);
      announce(`${id} has a new token: copy it now, it is shown once.`, 'ok');
      if (r.command_id != null) armCommands(500);
    } catch (e) { report(e, 'Cannot rotate the token'); }
  }
  function showToken(r) {
    const input = h('input', { id: 'new-token', readonly: true, value: r.token, 'data-testid': 'new-token', spellcheck: 'false', autocomplete: 'off' });
    const copy = async () => {
      try { await navigator.clipboard.writeText(r.token); announce('Token copied to the clipboard.', 'ok'); } catch {
        input.select();
        announce('Copying was refused here: the token is selected, press Ctrl+C (or ⌘C).');
      }
    };
    tokenPanel.replaceChildren(
      h('h2', { id: 'd-tok', text: 'New token' }),
      h('p', { class: 'note', text: 'Shown this once: the gateway keeps only its hash. Copy it now.' }),
      h('div', { class: 'token-box' }, h('div', { class: 'field grow' }, h('label', { for: 'new-token', text: `Token of ${id}` }), input),
        h('button', { type: 'button', class: 'btn primary', text: 'Copy', 'data-testid': 'copy-token', onclick: copy }),
        h('button', { type: 'button', class: 'btn', text: 'Done, hide it', onclick: () => { tokenPanel.replaceChildren(); tokenPanel.hidden = true; h1.focus(); } })),
      h('p', { class: 'muted' }, r.previous_valid_until_ms ? ['The old token works until ', when(r.previous_valid_until_ms), ' unless the device uses the new one first.'] : 'The old token no longer works.',
        r.command_id != null ? ` Delivered to the device as command #${r.command_id}.` : ''));
    tokenPanel.hidden = false;
    input.focus();
    input.select();
  }

  // ---- first load, then refreshes ----
  try {
    await loadDevice();
  } catch (e) {
    if (e.status === 404) view.append(h('p', { class: 'panel', text: `No device has the id "${id}".` }));
    else report(e, 'Cannot load the device');
    if (e.status === 404 || e.name === 'AbortError') return;
  }
  body.hidden = false;
  await Promise.all([
    loadTelemetry().catch((e) => report(e, 'Cannot load the telemetry')),
    loadCommands().catch((e) => report(e, 'Cannot load the commands')),
    loadState().catch((e) => report(e, 'Cannot load the state')),
  ]);
  window.addEventListener('resize', debounce(() => { if (fieldsKey) drawChart(JSON.parse(fieldsKey)); }, 250), { signal });
  every(5000, async () => { await loadDevice(); await Promise.all([loadTelemetry(), loadState()]); }, signal, 'Cannot refresh the device');
  armCommands = every(() => (pending() ? 2000 : 5000), loadCommands, signal, 'Cannot refresh the commands');
}
