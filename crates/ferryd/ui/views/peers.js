// Registered peer hosts and whether they answer.

import { get } from '../api.js';
import { badge, h, refill, table } from '../dom.js';
import { bytes, time } from '../format.js';

export default {
  id: 'peers',
  title: 'Peers',
  async render(root, ctx) {
    const body = h('div');
    root.append(
      h('h1', {}, 'Peers'),
      h('p', { class: 'muted' }, 'Other hosts this one can copy and migrate to, with their pool usage (', h('code', {}, 'ferry peer add'), ').'),
      body);
    const load = async () => {
      // The list does not check the peers; `show` does, one by one.
      const listed = await get('/v1/peers');
      const peers = await Promise.all(listed.map(p => get(`/v1/peers/${encodeURIComponent(p.name)}`).catch(() => p)));
      refill(body, table('Peers', [
        { title: 'Name', cell: p => p.name },
        { title: 'Host', cell: p => p.host_name },
        { title: 'URL', cell: p => h('code', {}, p.url) },
        { title: 'Version', cell: p => p.version },
        {
          title: 'Reachable',
          cell: p => (p.reachable === null || p.reachable === undefined
            ? '—'
            : badge(p.reachable ? 'reachable' : 'unreachable')),
        },
        {
          title: 'Pool used',
          num: true,
          cell: p => (p.pool
            ? `${bytes(p.pool.used_bytes)}${p.pool.limit_bytes ? ` of ${bytes(p.pool.limit_bytes)}` : ''}`
            : '—'),
        },
        { title: 'Volumes', num: true, cell: p => (p.pool ? String(p.pool.volumes) : '—') },
        { title: 'Latency', num: true, cell: p => (p.latency_ms === null || p.latency_ms === undefined ? '—' : `${p.latency_ms.toFixed(1)} ms`) },
        { title: 'Error', cell: p => p.error || '' },
        { title: 'Added', cell: p => time(p.added * 1000) },
      ], peers, 'No peers registered.'));
    };
    await load();
    ctx.poll(load, 10000);
  },
};
