// Operations: the list, and one operation live (progress tree from the
// event stream, steps, log, cancel).

import { events, get, post } from '../api.js';
import { badge, bar, fill, h, refill, table } from '../dom.js';
import { duration, percent, time } from '../format.js';
import { ProgressPanel } from '../progress.js';

const FINISHED = ['succeeded', 'failed', 'cancelled'];

function link(op) {
  return h('a', { href: `#/operations/${encodeURIComponent(op.id)}`, 'data-key': `op-${op.id}` }, op.id.slice(0, 8));
}

function overallOf(op) {
  return op.progress ? op.progress.overall : op.state === 'succeeded' ? 1 : 0;
}

async function renderList(root, ctx) {
  const body = h('div');
  root.append(h('h1', {}, 'Operations'), body);
  const load = async () => {
    const ops = await get('/v1/operations');
    ops.sort((a, b) => b.created_ms - a.created_ms);
    refill(body, table('Operations', [
      { title: 'Operation', cell: link },
      { title: 'Kind', cell: o => o.kind },
      { title: 'State', cell: o => badge(o.state) },
      { title: 'Started', cell: o => time(o.created_ms) },
      { title: 'Progress', cell: o => h('span', { class: 'inline-progress' }, bar(overallOf(o), `${o.kind} ${o.id}`), h('span', { class: 'num pct' }, percent(overallOf(o)))) },
      { title: 'Error', cell: o => o.error || '' },
    ], ops, 'No operations yet.'));
  };
  await load();
  ctx.poll(load, 2000);
}

function steps(op) {
  return table('Steps', [
    { title: 'Step', cell: s => s.name },
    { title: 'State', cell: s => badge(s.state) },
    { title: 'Took', num: true, cell: s => (s.finished_ms ? duration(s.finished_ms - s.started_ms) : '') },
    { title: 'Error', cell: s => s.error || '' },
  ], op.steps, 'No step has run yet.');
}

async function renderOne(root, ctx, id) {
  const state = h('span', { id: 'op-state' });
  const error = h('p', { class: 'error op-error', id: 'op-error', role: 'alert' });
  const cancelMsg = h('span', { class: 'status', role: 'status', id: 'op-cancel-status' });
  const cancel = h('button', { type: 'button', id: 'op-cancel', class: 'danger' }, 'Cancel operation');
  const panel = new ProgressPanel();
  const stepsEl = h('div', { id: 'op-steps' });
  const logEl = h('ol', { class: 'log', id: 'op-log', tabindex: 0, 'aria-label': 'Operation log' });
  const paramsEl = h('pre', { class: 'params', id: 'op-params' });
  const title = h('h1', {}, 'Operation');
  root.append(
    h('p', {}, h('a', { href: '#/operations' }, '← All operations')),
    title,
    h('div', { class: 'op-head' },
      h('p', {}, 'State: ', state, ' · ', h('code', {}, id)),
      h('div', { class: 'actions' }, cancel, cancelMsg)),
    error,
    panel.el,
    h('div', { class: 'grid' },
      h('section', { class: 'card', 'aria-labelledby': 'steps-h' }, h('h2', { id: 'steps-h' }, 'Steps'), stepsEl),
      h('section', { class: 'card', 'aria-labelledby': 'params-h' }, h('h2', { id: 'params-h' }, 'Parameters'), paramsEl)),
    h('section', { class: 'card', 'aria-labelledby': 'log-h' }, h('h2', { id: 'log-h' }, 'Log'), logEl));

  let finished = false;
  let logCount = -1;
  const show = op => {
    title.textContent = `Operation: ${op.kind}`;
    fill(state, badge(op.state));
    state.dataset.state = op.state;
    error.textContent = op.error || '';
    finished = FINISHED.includes(op.state);
    cancel.disabled = finished || op.state !== 'running';
    panel.update(op);
  };
  const showDetail = op => {
    show(op);
    refill(stepsEl, steps(op));
    paramsEl.textContent = JSON.stringify(op.params, null, 2);
    if (op.log.length !== logCount) {
      // Follow the end of the log unless the reader scrolled up.
      const atEnd = logEl.scrollTop + logEl.clientHeight >= logEl.scrollHeight - 4;
      logCount = op.log.length;
      fill(logEl, op.log.map(l => h('li', { class: `log-${l.level}` },
        h('span', { class: 'num ts' }, time(l.ts_ms).slice(11)), ' ',
        h('span', { class: 'lvl' }, l.level), ' ', l.msg)));
      if (atEnd) logEl.scrollTop = logEl.scrollHeight;
    }
  };

  cancel.addEventListener('click', async () => {
    cancel.disabled = true;
    cancelMsg.textContent = 'Cancelling…';
    try {
      await post(`/v1/operations/${encodeURIComponent(id)}/cancel`);
      cancelMsg.textContent = 'Cancel requested; the state below follows it.';
    } catch (e) {
      cancelMsg.textContent = `Not cancelled: ${e.message}`;
    }
  });

  const detail = async () => showDetail(await get(`/v1/operations/${encodeURIComponent(id)}`));
  await detail();
  if (finished) return;

  // Steps and the log are not in the progress events: fetch them now and
  // then while it runs.
  ctx.poll(async () => {
    if (!finished) await detail();
  }, 2000);
  events(`/v1/operations/${encodeURIComponent(id)}/events`, (name, op) => {
    if (name === 'end') showDetail(op);
    else show(op);
  }, ctx.signal)
    .then(() => (finished ? null : detail()))
    .catch(e => {
      // The stream broke (ferryd restarted?): the poll above carries on.
      ctx.report(e);
    });
}

export default {
  id: 'operations',
  title: 'Operations',
  async render(root, ctx) {
    if (ctx.params[0]) await renderOne(root, ctx, ctx.params[0]);
    else await renderList(root, ctx);
  },
};
