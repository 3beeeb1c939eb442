// Snapshot groups of VMs (`/v1/vm-snapshots`) and the form that takes one.

import { ApiError, get, post } from '../api.js';
import { h, refill, table } from '../dom.js';
import { ms, time } from '../format.js';

const NAME = /^[A-Za-z0-9_-]{1,64}$/;
const UP = ['running', 'paused'];

function fieldError(id) {
  return h('p', { class: 'error field-error', id, 'aria-live': 'polite' });
}

function form(ctx, vms, groups) {
  const vmErr = fieldError('gs-vms-error');
  const nameErr = fieldError('gs-name-error');
  const formErr = h('p', { class: 'error', id: 'gs-error', role: 'alert' });
  const boxes = vms.map(v => {
    const id = `gs-vm-${v.uuid}`;
    const up = UP.includes(v.state);
    return h('div', { class: 'check' },
      h('input', { type: 'checkbox', id, name: 'vms', value: v.name, disabled: !up, 'aria-describedby': 'gs-vms-error' }),
      h('label', { for: id }, v.name, h('span', { class: 'muted' }, ` (${v.state})`)));
  });
  const name = h('input', {
    id: 'gs-name', name: 'name', type: 'text', maxlength: 64, spellcheck: 'false', autocomplete: 'off',
    placeholder: 'generated when empty', 'aria-describedby': 'gs-name-hint gs-name-error',
  });
  const radio = (value, label, hint, checked) => h('div', { class: 'check' },
    h('input', { type: 'radio', name: 'mode', id: `gs-mode-${value}`, value, checked }),
    h('label', { for: `gs-mode-${value}` }, label, h('span', { class: 'muted' }, ` — ${hint}`)));
  const quiesce = h('input', { type: 'checkbox', id: 'gs-quiesce', name: 'quiesce', checked: true });
  const submit = h('button', { type: 'submit', id: 'gs-submit' }, 'Take group snapshot');

  const f = h('form', { id: 'groupsnap-form', class: 'card form', novalidate: true, 'aria-labelledby': 'gs-h' },
    h('h2', { id: 'gs-h' }, 'New group snapshot'),
    h('fieldset', {},
      h('legend', {}, 'VMs (running on this host)'),
      boxes.length ? boxes : h('p', { class: 'empty' }, 'No VMs defined.'),
      vmErr),
    h('label', { for: 'gs-name' }, 'Group name'),
    name,
    h('p', { class: 'hint', id: 'gs-name-hint' }, '1–64 of A–Z a–z 0–9 - _'),
    nameErr,
    h('fieldset', {},
      h('legend', {}, 'Mode'),
      radio('overlay', 'Overlay', 'guests are frozen only while overlays are added', true),
      radio('direct', 'Direct', 'guests stay frozen during the pool snapshot', false)),
    h('div', { class: 'check' }, quiesce,
      h('label', { for: 'gs-quiesce' }, 'Quiesce file systems through the guest agent')),
    h('div', { class: 'actions' }, submit),
    formErr);

  const setErr = (input, el, msg) => {
    el.textContent = msg || '';
    for (const i of Array.isArray(input) ? input : [input]) i.setAttribute('aria-invalid', msg ? 'true' : 'false');
  };
  const checked = () => [...f.querySelectorAll('input[name=vms]:checked')].map(i => i.value);

  /** Client-side checks, the same the daemon makes; the first bad field gets focus. */
  const validate = () => {
    const inputs = [...f.querySelectorAll('input[name=vms]')];
    const bad = [];
    if (!checked().length) {
      setErr(inputs, vmErr, 'Choose at least one running VM.');
      bad.push(inputs.find(i => !i.disabled) || inputs[0]);
    } else setErr(inputs, vmErr, '');
    const n = name.value.trim();
    if (n && !NAME.test(n)) {
      setErr(name, nameErr, 'Use 1–64 letters, digits, - or _.');
      bad.push(name);
    } else if (n && groups.some(g => g.name === n)) {
      setErr(name, nameErr, `A group named ${n} exists already.`);
      bad.push(name);
    } else setErr(name, nameErr, '');
    return bad.filter(Boolean);
  };
  name.addEventListener('input', () => {
    if (name.getAttribute('aria-invalid') === 'true') validate();
  });

  f.addEventListener('submit', async ev => {
    ev.preventDefault();
    formErr.textContent = '';
    const bad = validate();
    if (bad.length) {
      bad[0].focus();
      return;
    }
    const body = {
      vms: checked(),
      mode: f.querySelector('input[name=mode]:checked').value,
      quiesce: quiesce.checked,
    };
    if (name.value.trim()) body.name = name.value.trim();
    submit.disabled = true;
    try {
      const started = await post('/v1/vm-snapshots', body);
      ctx.go(`#/operations/${encodeURIComponent(started.operation)}`);
    } catch (e) {
      if (e instanceof ApiError && e.field === 'name') setErr(name, nameErr, e.message);
      formErr.textContent = `Not started: ${e.message}`;
      submit.disabled = false;
    }
  });
  return f;
}

function list(groups) {
  return table('Snapshot groups', [
    { title: 'Name', cell: g => g.name },
    { title: 'Mode', cell: g => g.mode },
    { title: 'Taken', cell: g => time(g.created * 1000) },
    {
      title: 'VMs',
      cell: g => h('ul', { class: 'plain' }, g.vms.map(v => h('li', {},
        v.name, ': ', h('span', { class: `badge cons-${v.consistency}` }, v.consistency.replace('_', '-')),
        ` · ${v.disks.length} disk${v.disks.length === 1 ? '' : 's'}`,
        v.frozen_ms !== null && v.frozen_ms !== undefined ? ` · frozen ${ms(v.frozen_ms)}` : ''))),
    },
    { title: 'Total', num: true, cell: g => ms(g.total_ms) },
    { title: 'Operation', cell: g => h('a', { href: `#/operations/${encodeURIComponent(g.operation)}` }, g.operation.slice(0, 8)) },
  ], groups, 'No snapshot groups yet.');
}

export default {
  id: 'groups',
  title: 'Snapshot groups',
  async render(root, ctx) {
    const listEl = h('section', { 'aria-labelledby': 'groups-h', id: 'groups-list' });
    const formEl = h('div');
    root.append(h('h1', {}, 'Snapshot groups'), formEl, h('h2', { id: 'groups-h' }, 'Groups'), listEl);
    const [vms, groups] = await Promise.all([get('/v1/vms'), get('/v1/vm-snapshots')]);
    vms.sort((a, b) => a.name.localeCompare(b.name));
    groups.sort((a, b) => b.created - a.created);
    const state = { groups };
    formEl.append(form(ctx, vms, state.groups));
    refill(listEl, list(groups));
    ctx.poll(async () => {
      const g = await get('/v1/vm-snapshots');
      g.sort((a, b) => b.created - a.created);
      state.groups.splice(0, state.groups.length, ...g);
      refill(listEl, list(g));
    }, 5000);
  },
};
