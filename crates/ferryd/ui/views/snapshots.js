// Pool snapshots (one per volume; a group snapshot makes one per disk).

import { get } from '../api.js';
import { h, refill, table } from '../dom.js';
import { bytes, time } from '../format.js';

export default {
  id: 'snapshots',
  title: 'Snapshots',
  async render(root, ctx) {
    const body = h('div');
    root.append(h('h1', {}, 'Snapshots'), body);
    const load = async () => {
      const snaps = await get('/v1/snapshots');
      snaps.sort((a, b) => b.created - a.created || a.name.localeCompare(b.name));
      refill(body, table('Snapshots', [
        { title: 'Name', cell: s => s.name },
        { title: 'Volume', cell: s => s.volume },
        { title: 'Size', num: true, cell: s => bytes(s.size) },
        { title: 'Group', cell: s => s.group || '' },
        { title: 'Taken', cell: s => time(s.created * 1000) },
      ], snaps, 'No snapshots.'));
    };
    await load();
    ctx.poll(load, 5000);
  },
};
