// A plain listing for API collections that have no dedicated view yet
// (backups, migrations): every scalar field of the items as a column.
// Replace with a module of its own when the feature's shape settles.

import { get } from '../api.js';
import { h, refill, table } from '../dom.js';

function cell(v) {
  if (v === null || v === undefined) return '';
  if (typeof v === 'object') return h('code', {}, JSON.stringify(v));
  return String(v);
}

export function generic({ id, title, path, lead }) {
  return {
    id,
    title,
    probe: path,
    async render(root, ctx) {
      const body = h('div');
      root.append(h('h1', {}, title), h('p', { class: 'muted' }, lead, ' (', h('code', {}, path), ').'), body);
      const load = async () => {
        let items = await get(path);
        if (!Array.isArray(items)) items = [items];
        const keys = [];
        for (const it of items) {
          for (const k of Object.keys(it || {})) if (!keys.includes(k)) keys.push(k);
        }
        refill(body, table(title, keys.map(k => ({ title: k, cell: it => cell(it[k]) })), items, 'None.'));
      };
      await load();
      ctx.poll(load, 5000);
    },
  };
}
