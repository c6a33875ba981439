// #/devices : the device list, paged by the server (50 at a time, never
// the whole fleet), filtered by id prefix, online status and tags.

import { h, page, num, when, badge, table, emptyRow, debounce, field, invalid, report } from './dom.js';
import { api, path } from './api.js';

// Kept while the console is open, so going back to the list finds it as it was.
const st = { prefix: '', online: '', tags: '', after: null, stack: [], noFilters: false };
const PAGE = 50;

export function statusCell(d) {
  if (d.revoked_ms) return badge('revoked', 'bad');
  return d.online ? [badge('online', 'ok'), d.instance ? h('span', { class: 'muted', text: ` ${d.instance}` }) : null] : badge('offline');
}
export const deviceLink = (id) => h('a', { href: `#/devices/${encodeURIComponent(id)}`, text: id });

export async function render({ view, signal }) {
  const search = h('input', { id: 'dev-prefix', type: 'search', value: st.prefix, autocomplete: 'off', spellcheck: 'false', 'data-testid': 'device-search' });
  const online = h('select', { id: 'dev-online', 'data-testid': 'device-online' },
    h('option', { value: '', text: 'All' }), h('option', { value: 'true', text: 'Online' }), h('option', { value: 'false', text: 'Offline' }));
  online.value = st.online;
  const tagIn = h('input', { id: 'dev-tag', value: st.tags, autocomplete: 'off', spellcheck: 'false', placeholder: 'site:north', 'data-testid': 'device-tag' });
  const unsupported = h('p', { class: 'note', hidden: !st.noFilters, text: 'This gateway cannot filter by id prefix or status yet: those filters are left out.' });
  const t = table([['Device'], ['Status'], ['Last seen'], ['Last seq', 'num'], ['Tags']], { 'aria-label': 'Devices', 'data-testid': 'device-table' });
  const info = h('span', { class: 'muted', 'aria-live': 'polite' });
  const btn = (text, testid, onclick) => h('button', { type: 'button', class: 'btn small', text, 'data-testid': testid, onclick });
  const first = btn('First page', 'first-page', () => { st.stack = []; st.after = null; load(true); });
  const prev = btn('Previous page', 'prev-page', () => { st.after = st.stack.pop() ?? null; load(true); });
  const next = btn('Next page', 'next-page', () => { st.stack.push(st.after); st.after = nextAfter; load(true); });
  let nextAfter = null, seq = 0, ctrl = null;

  const reset = () => { st.stack = []; st.after = null; };
  const tagTerms = () => st.tags.split(/[\s,]+/).filter(Boolean);
  function apply() {
    st.prefix = search.value.trim();
    st.online = online.value;
    const bad = tagIn.value.split(/[\s,]+/).filter(Boolean).find((x) => !/^[^:]+:.+$/.test(x));
    invalid(tagIn, bad ? `"${bad}" is not key:value` : '');
    if (bad) return;
    st.tags = tagIn.value.trim();
    reset();
    load();
  }
  const form = h('form', { role: 'search', class: 'row panel', 'aria-label': 'Filter devices', onsubmit: (e) => { e.preventDefault(); apply(); } },
    h('div', { class: 'grow' }, field('Id starts with', search)),
    field('Status', online),
    h('div', { class: 'grow' }, field('Tags (key:value, space separated)', tagIn)),
    h('button', { type: 'submit', class: 'btn', text: 'Apply' }));
  search.addEventListener('input', debounce(apply, 300));
  online.addEventListener('change', apply);
  tagIn.addEventListener('change', apply);
  view.append(page('Devices'), form, unsupported, t.wrap, h('div', { class: 'pager' }, first, prev, next, info,
    h('button', { type: 'button', class: 'btn small quiet', text: 'Refresh', onclick: () => load() })));

  async function load(paging) {
    const my = ++seq;
    ctrl?.abort();
    ctrl = new AbortController();
    const c = ctrl;
    signal.addEventListener('abort', () => c.abort(), { once: true });
    t.table.setAttribute('aria-busy', 'true');
    const q = { limit: PAGE, tag: tagTerms() };
    if (!st.noFilters) { q.prefix = st.prefix; q.online = st.online; }
    let pg, after = st.after;
    try {
      // With the online filter a page may come back empty yet have a next:
      // follow a few of those rather than show an empty page.
      for (let hops = 0; ; hops++) {
        pg = await api(path(['devices'], { ...q, after }), { signal: c.signal });
        if ((pg.devices || []).length || !pg.next || !q.online || hops >= 4) break;
        after = pg.next;
      }
    } catch (e) {
      if (my !== seq) return;
      t.table.removeAttribute('aria-busy');
      if (e.status === 400 && /unknown query parameter/i.test(e.message) && !st.noFilters) {
        st.noFilters = true; unsupported.hidden = false; load(paging); return;
      }
      report(e, 'Cannot list the devices');
      return;
    }
    if (my !== seq) return;
    t.table.removeAttribute('aria-busy');
    const list = pg.devices || [];
    nextAfter = pg.next ?? null;
    t.tbody.replaceChildren(...(list.length ? list.map(row)
      : [emptyRow(5, nextAfter ? 'None in this stretch of the fleet: look on the next page.' : 'No device matches.')]));
    first.disabled = prev.disabled = !st.stack.length;
    next.disabled = !nextAfter;
    info.textContent = `Page ${st.stack.length + 1}: ${num(list.length)} device${list.length === 1 ? '' : 's'}${nextAfter ? ', more after' : ''}`;
    if (paging && (!document.activeElement || document.activeElement.disabled || document.activeElement === document.body)) t.wrap.focus();
  }

  function addTag(term) {
    const terms = tagTerms();
    if (!terms.includes(term)) terms.push(term);
    tagIn.value = terms.join(' ');
    apply();
  }
  function row(d) {
    const tags = Object.entries(d.tags || {});
    return h('tr', { 'data-testid': 'device-row', 'data-device-id': d.device_id },
      h('th', { scope: 'row' }, deviceLink(d.device_id)),
      h('td', null, statusCell(d)),
      h('td', null, when(d.last_seen_ms)),
      h('td', { class: 'num', text: num(d.last_seq) }),
      h('td', null, h('div', { class: 'tags' }, tags.map(([k, v]) => h('button', {
        type: 'button', class: 'tag', text: `${k}:${v}`, 'aria-label': `Filter by tag ${k}:${v}`, onclick: () => addTag(`${k}:${v}`),
      })))));
  }
  await load();
}
