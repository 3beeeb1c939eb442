// VMs of this host: state, disks, and start/stop.

import { get, post } from '../api.js';
import { badge, h, refill, table } from '../dom.js';

const RUNNING = ['running', 'paused'];

function disks(vm) {
  return h('ul', { class: 'plain' }, vm.disks.map(d => h('li', {},
    h('code', {}, d.id), ' → ',
    d.volume ? `volume ${d.volume}${d.host ? ` on peer ${d.host}` : ''}` : h('code', {}, d.file || '?'),
    d.read_only ? ' (read-only)' : '')));
}

export default {
  id: 'vms',
  title: 'VMs',
  async render(root, ctx) {
    const status = h('p', { class: 'status', role: 'status' });
    const body = h('div');
    root.append(h('h1', {}, 'VMs'), status, body);

    const busy = new Set();
    const act = async (btn, vm, what) => {
      btn.disabled = true;
      busy.add(vm.uuid);
      status.textContent = `${what === 'start' ? 'Starting' : 'Stopping'} ${vm.name}…`;
      try {
        const r = await post(`/v1/vms/${encodeURIComponent(vm.uuid)}/${what}`);
        const outcome = r && r.outcome ? ` (${r.outcome})` : '';
        status.textContent = `${vm.name}: ${what === 'start' ? 'started' : 'stopped'}${outcome}.`;
      } catch (e) {
        status.textContent = '';
        ctx.report(e);
      }
      busy.delete(vm.uuid);
      await load();
    };

    const load = async () => {
      const vms = await get('/v1/vms');
      vms.sort((a, b) => a.name.localeCompare(b.name));
      refill(body, table('VMs', [
        { title: 'Name', cell: v => h('span', { title: v.uuid }, v.name) },
        { title: 'State', cell: v => [badge(v.state), v.note ? h('span', { class: 'muted' }, ` ${v.note}`) : ''] },
        { title: 'vCPUs', num: true, cell: v => v.definition.vcpus },
        { title: 'Memory', num: true, cell: v => `${v.definition.memory_mib} MiB` },
        { title: 'Disks', cell: disks },
        { title: 'PID', num: true, cell: v => v.pid || '' },
        {
          title: 'Actions',
          cell: v => {
            const up = RUNNING.includes(v.state);
            const btn = h('button', {
              type: 'button',
              'data-key': `vm-${v.uuid}`,
              'aria-label': `${up ? 'Stop' : 'Start'} ${v.name}`,
              disabled: busy.has(v.uuid),
            }, up ? 'Stop' : 'Start');
            btn.addEventListener('click', () => act(btn, v, up ? 'stop' : 'start'));
            return btn;
          },
        },
      ], vms, 'No VMs defined (ferry vm define).'));
    };
    await load();
    ctx.poll(load, 5000);
  },
};
