// #/firmware : the stored images, newest first.

import { h, page, num, bytes, when, table, emptyRow, report } from './dom.js';
import { api } from './api.js';

export async function render({ view, signal }) {
  const t = table([['Name'], ['Version'], ['Model'], ['Size', 'num'], ['Created'], ['Id (SHA-256)']], { 'aria-label': 'Firmware images, newest first', 'data-testid': 'firmware-table' });
  view.append(page('Firmware'), t.wrap);
  try {
    const list = await api('/v1/firmware', { signal });
    const rows = Array.isArray(list) ? list : list?.images || [];
    t.tbody.replaceChildren(...(rows.length ? rows.map((f) => h('tr', { 'data-testid': 'firmware-row', 'data-image-id': f.id },
      h('th', { scope: 'row', text: f.name }),
      h('td', { text: f.version }),
      h('td', { text: f.model }),
      h('td', { class: 'num', title: `${num(f.size)} bytes`, text: bytes(f.size) }),
      h('td', null, when(f.created_ms), h('div', { class: 'muted', text: `by ${f.created_by ?? '?'}` })),
      h('td', { class: 'mono', title: f.id, text: `${String(f.id).slice(0, 12)}…` }))) : [emptyRow(6, 'No firmware images.')]));
  } catch (e) { report(e, 'Cannot list the firmware'); }
}
