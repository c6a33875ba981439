// DOM building (never innerHTML), formatting, the message region, the
// confirmation dialog and polling. Everything shown from the API goes in
// as text nodes or attribute values.

const SVGNS = 'http://www.w3.org/2000/svg';

function build(el, attrs, kids) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'value' && 'value' in el && el.namespaceURI !== SVGNS) el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of kids.flat(9)) if (c != null && c !== false) el.append(c);
  return el;
}
/** An HTML element: h('a', {href, class, text}, ...children). */
export const h = (tag, attrs, ...kids) => build(document.createElement(tag), attrs, kids);
/** An SVG element. */
export const s = (tag, attrs, ...kids) => build(document.createElementNS(SVGNS, tag), attrs, kids);
export const $ = (id) => document.getElementById(id);

// ---- formatting ----
export function num(n, digits = 0) {
  if (n == null || !Number.isFinite(Number(n))) return '—';
  return Number(n).toLocaleString('en-US', { maximumFractionDigits: digits });
}
export function bytes(n) {
  if (n == null) return '—';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = Number(n), i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return `${num(v, i && v < 100 ? 1 : 0)} ${u[i]}`;
}
const p2 = (n) => String(n).padStart(2, '0');
/** Local time, YYYY-MM-DD HH:MM:SS. */
export function ymd(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${p2(d.getMonth() + 1)}-${p2(d.getDate())} ${p2(d.getHours())}:${p2(d.getMinutes())}:${p2(d.getSeconds())}`;
}
export const hms = (ms, secs) => { const d = new Date(ms); return `${p2(d.getHours())}:${p2(d.getMinutes())}${secs ? ':' + p2(d.getSeconds()) : ''}`; };
let skew = 0; // the gateway's clock minus ours, from /v1/overview
export const setSkew = (v) => { skew = Number.isFinite(v) ? v : 0; };
export const now = () => Date.now() + skew;
export function rel(ms) {
  let d = Math.round((now() - ms) / 1000);
  const future = d < 0;
  d = Math.abs(d);
  const t = d < 60 ? `${d} s` : d < 3600 ? `${Math.floor(d / 60)} min` : d < 172800 ? `${Math.floor(d / 3600)} h` : `${Math.floor(d / 86400)} d`;
  return future ? `in ${t}` : `${t} ago`;
}
/** A date cell: local time plus relative time. */
export function when(ms) {
  if (ms == null) return h('span', { class: 'muted', text: '—' });
  return h('span', { class: 'nowrap' }, h('time', { datetime: new Date(ms).toISOString(), text: ymd(ms) }), ' ',
    h('span', { class: 'muted', text: `(${rel(ms)})` }));
}
export const badge = (text, kind = '', attrs = {}) => h('span', { ...attrs, class: `badge ${kind}`, text });
const STATE_KIND = {
  succeeded: 'ok', completed: 'ok', online: 'ok', failed: 'bad', timed_out: 'bad', aborted: 'bad', expired: 'bad',
  revoked: 'bad', unknown_command: 'bad', delivered: 'busy', in_progress: 'busy', running: 'busy',
};
export const stateBadge = (st, attrs) => badge(String(st).replace(/_/g, ' '), STATE_KIND[st] || '', attrs);
export function json(v, pretty) {
  try { return JSON.stringify(v, null, pretty ? 2 : 0) ?? String(v); } catch { return String(v); }
}
/** A payload as text: JSON as JSON; text decoded from base64; anything else as base64. */
export function payloadText(p, type) {
  if (type === 'json' || typeof p !== 'string') return json(p);
  if (type === 'text') {
    try { return new TextDecoder().decode(Uint8Array.from(atob(p), (c) => c.charCodeAt(0))); } catch { /* as is */ }
  }
  return `${p} (${type || 'binary'}, base64)`;
}
/** A page's heading (focused on navigation) and the tab's title. */
export function page(title) {
  document.title = `${title} · Furrow`;
  return h('h1', { tabindex: '-1', text: title });
}

// ---- messages: one aria-live region (always rendered, so screen readers
// hear each change) for results and errors, never alerts ----
let clearTimer;
export function announce(msg, kind = 'info') {
  clearTimeout(clearTimer);
  $('announce').textContent = msg;
  $('announce-wrap').className = `announce ${kind}`;
  if (kind !== 'error') clearTimer = setTimeout(clearAnnounce, 10000);
}
export function clearAnnounce() {
  clearTimeout(clearTimer);
  $('announce').textContent = '';
  $('announce-wrap').className = 'announce empty';
}
/** Shows an API or network error; aborted requests and handled 401s stay silent. */
export function report(e, what) {
  if (!e || e.name === 'AbortError' || e.handled) return;
  const code = e.status ? ` (${e.status}${e.code ? ` ${e.code}` : ''})` : '';
  announce(`${what ? `${what}: ` : ''}${e.message || e}${code}`, 'error');
}

// ---- confirmation: a modal <dialog>; focus goes in and comes back ----
export function confirmDialog({ title, body, yes = 'Confirm', danger = true, extra = null }) {
  const dlg = $('confirm'), yesBtn = $('confirm-yes'), noBtn = $('confirm-no');
  $('confirm-title').textContent = title;
  $('confirm-body').textContent = body;
  $('confirm-extra').replaceChildren(...(extra ? [extra] : []));
  yesBtn.textContent = yes;
  yesBtn.className = `btn ${danger ? 'danger' : 'primary'}`;
  const opener = document.activeElement;
  return new Promise((resolve) => {
    const done = (v) => {
      yesBtn.onclick = noBtn.onclick = dlg.oncancel = null;
      if (dlg.open) dlg.close();
      if (opener && opener.isConnected) opener.focus();
      resolve(v);
    };
    yesBtn.onclick = () => done(true);
    noBtn.onclick = () => done(false);
    dlg.oncancel = (e) => { e.preventDefault(); done(false); };
    dlg.showModal();
    (extra?.querySelector('input,select,textarea') || noBtn).focus();
  });
}

// ---- polling: one call at a time, paused while the tab is hidden ----
/** Calls fn every ms (a number or a function giving it); returns arm(d) to run sooner. */
export function every(ms, fn, signal, what) {
  let timer;
  const delay = () => (typeof ms === 'function' ? ms() : ms);
  const arm = (d) => { clearTimeout(timer); if (!signal.aborted) timer = setTimeout(tick, d); };
  const tick = async () => {
    clearTimeout(timer);
    if (signal.aborted) return;
    if (!document.hidden) {
      try { await fn(); } catch (e) { report(e, what); }
    }
    arm(delay());
  };
  arm(delay());
  signal.addEventListener('abort', () => clearTimeout(timer), { once: true });
  return arm;
}
export function debounce(fn, ms) {
  let t;
  return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
}
/** A table in a scroll container (focusable, to scroll it by keyboard): heads are [text, class?]. */
export function table(heads, attrs = {}, wrapClass = '') {
  const tbody = h('tbody');
  const t = h('table', attrs, h('thead', null, h('tr', null,
    heads.map(([text, cls]) => h('th', { scope: 'col', class: cls, text })))), tbody);
  const wrap = h('div', { class: `table-wrap ${wrapClass}`, tabindex: 0, role: 'region', 'aria-label': attrs['aria-label'] }, t);
  return { wrap, table: t, tbody };
}
/** Fills a <dl class="kv"> from [term, value] pairs; falsy pairs and null values are left out. */
export function kvRows(dl, rows) {
  dl.replaceChildren(...rows.filter((r) => r && r[1] != null).map(([k, v]) => h('div', null, h('dt', { text: k }), h('dd', null, v))));
}
export const emptyRow = (cols, text) => h('tr', null, h('td', { colspan: cols, class: 'empty', text }));
/** A labelled field. */
export function field(label, control, hint) {
  const id = control.id || (control.id = `f${Math.random().toString(36).slice(2, 9)}`);
  const kids = [h('label', { for: id, text: label }), control];
  if (hint) {
    const hid = `${id}-hint`;
    control.setAttribute('aria-describedby', hid);
    kids.push(h('p', { id: hid, class: 'hint', text: hint }));
  }
  return h('div', { class: 'field' }, kids);
}
/** Marks a field invalid with a message (or clears it). */
export function invalid(control, msg) {
  const id = `${control.id}-err`;
  document.getElementById(id)?.remove();
  if (!msg) { control.removeAttribute('aria-invalid'); return; }
  control.setAttribute('aria-invalid', 'true');
  control.setAttribute('aria-errormessage', id);
  control.after(h('p', { id, class: 'field-error', text: msg }));
}
