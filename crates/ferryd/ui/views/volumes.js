// Pool volumes: size and how much of it is this volume's own data.

import { get } from '../api.js';
import { h, refill, table } from '../dom.js';
import { bytes } from '../format.js';

export default {
  id: 'volumes',
  title: 'Volumes',
  async render(root, ctx) {
    const body = h('div');
    root.append(h('h1', {}, 'Volumes'), body);
    const load = async () => {
      const vols = await get('/v1/volumes');
      refill(body, table('Volumes', [
        { title: 'Name', cell: v => v.name },
        { title: 'Size', num: true, cell: v => bytes(v.size) },
        { title: 'Own data', num: true, cell: v => bytes(v.exclusive_bytes) },
        { title: 'Shared', num: true, cell: v => bytes(v.shared_bytes) },
        { title: 'Clone of', cell: v => v.parent_snapshot || '' },
        { title: 'Lazy', cell: v => (v.lazy ? 'yes' : '') },
      ], vols, 'No volumes.'));
    };
    await load();
    ctx.poll(load, 5000);
  },
};
