// An operation's progress: the overall bar with its ETA, the current step,
// and the weighted tree with every node's percentage. Built once and then
// updated in place, so a stream of updates never moves the layout.

import { bar, h, setBar } from './dom.js';
import { duration, percent } from './format.js';

/** The deepest unfinished node on the path the work follows (as the
 * daemon's `ProgressView::current`). */
export function currentStep(p) {
  if (!p || !p.nodes.length) return null;
  let at = p.nodes[0];
  for (;;) {
    const next = at.children.map(c => p.nodes[c]).find(n => n && n.fraction < 1);
    if (!next) return at.id === 0 ? null : at.name;
    at = next;
  }
}

/** A weight in at most five characters (weights may be byte counts). */
function compact(w) {
  for (const [div, unit] of [[1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k']]) {
    if (w >= div) return `${(w / div).toFixed(w / div < 10 ? 1 : 0)}${unit}`;
  }
  return String(Math.round(w * 100) / 100);
}

function shapeOf(p) {
  return p ? p.nodes.map(n => `${n.id}/${n.parent}/${n.name}/${n.weight}`).join('|') : '';
}

export class ProgressPanel {
  constructor() {
    this.bar = bar(0, 'Overall progress', 'op-overall');
    this.pct = h('span', { class: 'num pct', id: 'op-percent' }, percent(0));
    this.elapsed = h('span', { class: 'num', id: 'op-elapsed' }, '—');
    this.eta = h('span', { class: 'num', id: 'op-eta' }, '—');
    this.current = h('span', { id: 'op-current' }, '—');
    this.tree = h('ul', { class: 'tree', id: 'op-tree', 'aria-label': 'Progress tree' });
    this.rows = new Map();
    this.shape = null;
    this.el = h('section', { class: 'card progress', 'aria-labelledby': 'progress-h' },
      h('h2', { id: 'progress-h' }, 'Progress'),
      h('div', { class: 'overall' }, this.bar, this.pct),
      h('p', { class: 'times' },
        h('span', {}, 'Elapsed ', this.elapsed),
        h('span', {}, 'Time left ', this.eta)),
      h('p', { class: 'current' }, 'Current step: ', this.current),
      this.tree);
  }

  /** `op` is an API `Operation`. */
  update(op) {
    const p = op.progress;
    const done = op.state === 'succeeded';
    const overall = p ? p.overall : done ? 1 : 0;
    setBar(this.bar, overall);
    this.pct.textContent = percent(overall);
    this.elapsed.textContent = p ? duration(p.elapsed_ms) : '—';
    const finished = ['succeeded', 'failed', 'cancelled'].includes(op.state);
    this.eta.textContent = finished || (p && p.complete)
      ? 'none'
      : p && p.eta_ms !== null && p.eta_ms !== undefined ? duration(p.eta_ms) : 'estimating';
    this.current.textContent = finished ? `— (${op.state})` : currentStep(p) || '—';
    const shape = shapeOf(p);
    if (shape !== this.shape) {
      this.shape = shape;
      this.build(p);
    }
    if (!p) return;
    for (const n of p.nodes) {
      const row = this.rows.get(n.id);
      if (!row) continue;
      setBar(row.bar, n.fraction);
      row.pct.textContent = percent(n.fraction);
      row.li.classList.toggle('done', n.fraction >= 1);
    }
  }

  build(p) {
    this.rows.clear();
    this.tree.replaceChildren();
    if (!p || !p.nodes.length) {
      this.tree.append(h('li', { class: 'muted' }, 'This operation reports no progress tree.'));
      return;
    }
    const node = id => {
      const n = p.nodes[id];
      const siblings = n.parent === null || n.parent === undefined ? [n] : p.nodes[n.parent].children.map(c => p.nodes[c]);
      const total = siblings.reduce((s, x) => s + x.weight, 0);
      const share = total > 0 ? Math.round((n.weight / total) * 100) : 0;
      const row = {
        bar: bar(n.fraction, n.name),
        pct: h('span', { class: 'num pct' }, percent(n.fraction)),
      };
      row.li = h('li', { dataset: { node: n.id } },
        h('div', { class: 'node' },
          h('span', { class: 'name' }, n.name),
          h('span', { class: 'num weight', title: `weight ${n.weight}: ${share} % of its parent` }, `w ${compact(n.weight).padStart(5, '\u2007')} · ${String(share).padStart(3, '\u2007')} %`),
          row.bar,
          row.pct),
        n.children.length ? h('ul', {}, n.children.map(node)) : null);
      this.rows.set(n.id, row);
      return row.li;
    };
    // The root is the operation itself (the overall bar above).
    const root = p.nodes[0];
    this.tree.append(...(root.children.length ? root.children.map(node) : [node(0)]));
  }
}
