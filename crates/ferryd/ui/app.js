// The dashboard's shell: sign-in, navigation, and the view router.
// Each section is one module in views/ exporting
//   { id, title, probe?, render(root, ctx) }
// `probe` names an API path; the section shows only when ferryd serves it
// (a 404 hides it), so sections for features still being built appear by
// themselves once the daemon has them.

import { ApiError, call, has, setToken, token, whenUnauthorized } from './api.js';
import { fill, h } from './dom.js';
import host from './views/host.js';
import peers from './views/peers.js';
import vms from './views/vms.js';
import volumes from './views/volumes.js';
import snapshots from './views/snapshots.js';
import groups from './views/groups.js';
import operations from './views/operations.js';
import { generic } from './views/generic.js';

const VIEWS = [
  host,
  peers,
  vms,
  volumes,
  snapshots,
  groups,
  operations,
  generic({ id: 'backups', title: 'Backups', path: '/v1/repos', lead: 'Backup repositories' }),
  generic({ id: 'migrations', title: 'Migrations', path: '/v1/migrations', lead: 'Migration batches' }),
];

const $ = id => document.getElementById(id);

let shown = [];
let current = null; // { cleanups: [], abort: AbortController }

function showLogin(message) {
  stopView();
  $('app').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  const input = $('token');
  input.setAttribute('aria-invalid', message ? 'true' : 'false');
  input.focus();
}

async function signIn(t) {
  // The peer token opens part of the API too: ask for an admin-only
  // listing first, so that only the admin token signs in.
  await call('GET', '/v1/peers', undefined, t);
  return call('GET', '/v1/host', undefined, t);
}

function refusal(e) {
  if (!(e instanceof ApiError)) return `ferryd did not answer (${e.message}).`;
  if (e.status === 401) return `The token was refused: ${e.message}. Use the admin token from admin.token in ferryd's data directory.`;
  if (e.status === 403) return 'This is a peer token: the dashboard needs the admin token.';
  return `Sign-in failed: ${e.message}`;
}

async function onLoginSubmit(ev) {
  ev.preventDefault();
  const t = $('token').value.trim();
  if (!t) {
    showLogin('Enter the API token.');
    return;
  }
  const btn = $('login-submit');
  btn.disabled = true;
  $('login-error').textContent = '';
  try {
    const info = await signIn(t);
    setToken(t);
    $('token').value = '';
    await showApp(info);
  } catch (e) {
    showLogin(refusal(e));
  } finally {
    btn.disabled = false;
  }
}

async function showApp(info) {
  $('login').hidden = true;
  $('app').hidden = false;
  $('host-name').textContent = `${info.name} · ferryd ${info.version}`;
  const present = await Promise.all(VIEWS.map(v => (v.probe ? has(v.probe) : true)));
  shown = VIEWS.filter((_, i) => present[i]);
  fill($('nav'), shown.map(v => h('li', {}, h('a', { href: `#/${v.id}`, id: `nav-${v.id}` }, v.title))));
  route();
}

function stopView() {
  if (!current) return;
  current.abort.abort();
  for (const c of current.cleanups) c();
  current = null;
}

async function route(ev) {
  const moved = ev instanceof HashChangeEvent;
  if ($('app').hidden) return;
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  const view = shown.find(v => v.id === parts[0]) || shown[0];
  stopView();
  const ctx = {
    params: parts.slice(1),
    cleanups: [],
    abort: new AbortController(),
  };
  ctx.signal = ctx.abort.signal;
  /** Runs `f` every `ms` while the view is shown (not while hidden). */
  ctx.poll = (f, ms) => {
    const t = setInterval(() => {
      if (!document.hidden) f().catch(report);
    }, ms);
    ctx.cleanups.push(() => clearInterval(t));
  };
  ctx.go = hash => {
    location.hash = hash;
  };
  ctx.report = report;
  current = ctx;
  for (const a of $('nav').querySelectorAll('a')) {
    if (a.id === `nav-${view.id}`) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  $('banner').textContent = '';
  const root = fill($('view'));
  root.dataset.view = view.id;
  document.title = `${view.title} · Ferry`;
  try {
    await view.render(root, ctx);
  } catch (e) {
    report(e);
  }
  // Keyboard users land on the new content, not back on the nav.
  if (moved) $('main').focus({ preventScroll: true });
}

/** Shows an error of a background refresh (the view keeps its content). */
function report(e) {
  if (e && e.name === 'AbortError') return;
  if (e instanceof ApiError && e.status === 401) return; // handled by whenUnauthorized
  $('banner').textContent = e instanceof ApiError ? e.message : `ferryd did not answer (${e.message})`;
}

async function start() {
  $('login-form').addEventListener('submit', onLoginSubmit);
  $('logout').addEventListener('click', () => {
    setToken(null);
    showLogin('Signed out.');
  });
  window.addEventListener('hashchange', route);
  whenUnauthorized(e => {
    setToken(null);
    showLogin(`ferryd no longer accepts this session's token (${e.message}). Sign in again.`);
  });
  const t = token();
  if (!t) {
    showLogin('');
    return;
  }
  try {
    await showApp(await signIn(t));
  } catch (e) {
    setToken(null);
    showLogin(refusal(e));
  }
}

start();
