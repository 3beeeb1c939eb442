// Building DOM nodes without HTML strings: every text goes in as a text
// node, so nothing the API returns is ever parsed as markup.

/** h('div', {class: 'x', onclick: fn}, child, ...) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') {
      el.addEventListener(k.slice(2), v);
    } else if (k === 'dataset') {
      Object.assign(el.dataset, v);
    } else if (v === true) {
      el.setAttribute(k, '');
    } else {
      el.setAttribute(k, String(v));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
}

/** Replaces every child of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A table from rows: `cols` is [{title, cell: row => node|text, num}]. */
export function table(caption, cols, rows, empty) {
  if (!rows.length) {
    return h('p', { class: 'empty' }, empty || 'None.');
  }
  return h('table', {},
    h('caption', { class: 'sr-only' }, caption),
    h('thead', {}, h('tr', {}, cols.map(c => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.title)))),
    h('tbody', {}, rows.map(r => h('tr', {}, cols.map(c => h('td', { class: c.num ? 'num' : null }, c.cell(r)))))),
  );
}

/** A state badge (`running`, `failed`, ...). */
export function badge(state) {
  return h('span', { class: `badge state-${state}` }, state);
}

/** A horizontal bar; `fraction` in [0, 1]. Width set through the CSSOM
 * (allowed by the page's style policy, unlike style attributes). */
export function bar(fraction, label, id) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
  const fillEl = h('span', { class: 'bar-fill' });
  fillEl.style.width = `${pct}%`;
  return h('span', {
    class: 'bar', role: 'progressbar', id,
    'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': pct, 'aria-label': label,
  }, fillEl);
}

/** Updates a bar made by `bar` in place (no new nodes, no layout jump). */
export function setBar(el, fraction) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
  el.setAttribute('aria-valuenow', pct);
  el.firstChild.style.width = `${pct}%`;
}

/**
 * Replaces the children of `el` like `fill`, keeping keyboard focus on the
 * element with the same `data-key` (a periodic refresh must not throw the
 * focus back to the top of the page).
 */
export function refill(el, ...children) {
  const active = document.activeElement;
  const key = active && el.contains(active) ? active.dataset.key : undefined;
  fill(el, ...children);
  if (key) {
    const again = el.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (again) again.focus();
  }
  return el;
}
