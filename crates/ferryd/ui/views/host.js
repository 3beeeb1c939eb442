// This host: name, version, NBD endpoints, and its pool's usage.

import { get } from '../api.js';
import { bar, h, refill } from '../dom.js';
import { bytes, duration } from '../format.js';

function dl(pairs) {
  return h('dl', { class: 'facts' }, pairs.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

export default {
  id: 'host',
  title: 'Host',
  async render(root, ctx) {
    const body = h('div', { class: 'grid' });
    root.append(h('h1', {}, 'Host'), body);
    const load = async () => {
      const [host, pool] = await Promise.all([get('/v1/host'), get('/v1/pool')]);
      const used = pool.limit_bytes ? pool.used_bytes / pool.limit_bytes : null;
      refill(body,
        h('section', { class: 'card', 'aria-labelledby': 'host-h' },
          h('h2', { id: 'host-h' }, host.name),
          dl([
            ['Version', host.version],
            ['Accelerator', host.accel],
            ['Up for', duration(host.uptime_s * 1000)],
            ['NBD', host.nbd.length ? host.nbd.join(', ') : '—'],
            ['Data directory', h('code', {}, host.data_dir)],
          ])),
        h('section', { class: 'card', 'aria-labelledby': 'pool-h' },
          h('h2', { id: 'pool-h' }, 'Pool'),
          used === null
            ? h('p', {}, h('span', { class: 'num', id: 'pool-used' }, bytes(pool.used_bytes)), ' used (no limit set)')
            : h('div', {},
              bar(used, 'Pool usage', 'pool-bar'),
              h('p', {}, h('span', { class: 'num', id: 'pool-used' }, bytes(pool.used_bytes)), ' of ', bytes(pool.limit_bytes), ' used')),
          dl([
            ['Volumes', h('span', { class: 'num' }, pool.volumes)],
            ['Snapshots', h('span', { class: 'num' }, pool.snapshots)],
            ['Chunk size', bytes(pool.chunk_size)],
          ])),
      );
    };
    await load();
    ctx.poll(load, 5000);
  },
};
