// The /v1 API with the session's bearer token.

const KEY = 'ferry.token';

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || null;
  }
}

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(t) {
  if (t) sessionStorage.setItem(KEY, t);
  else sessionStorage.removeItem(KEY);
}

let onUnauthorized = () => {};

/** Called when a call answers 401 (the token stopped working). */
export function whenUnauthorized(f) {
  onUnauthorized = f;
}

function headers(t, json) {
  const hd = { Authorization: `Bearer ${t}` };
  if (json) hd['Content-Type'] = 'application/json';
  return hd;
}

async function failure(r) {
  let msg = `${r.status} ${r.statusText}`;
  let field = null;
  try {
    const body = await r.json();
    if (body && body.error) {
      msg = body.error;
      field = body.field;
    }
  } catch (_) {
    // Not the API's error shape: keep the status line.
  }
  return new ApiError(r.status, msg, field);
}

/** One call; resolves to the parsed body (null for 202/204 without one). */
export async function call(method, path, body, t = token()) {
  const r = await fetch(path, {
    method,
    headers: headers(t, body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
  });
  if (!r.ok) {
    const e = await failure(r);
    if (r.status === 401 && t === token()) onUnauthorized(e);
    throw e;
  }
  const text = await r.text();
  return text ? JSON.parse(text) : null;
}

export const get = path => call('GET', path);
export const post = (path, body) => call('POST', path, body);

/** Whether the API serves `path` (404 = not built into this ferryd). */
export async function has(path) {
  try {
    await call('GET', path);
    return true;
  } catch (e) {
    return e.status !== 404;
  }
}

/**
 * Reads a server-sent event stream (EventSource cannot send the token):
 * calls `on(event, data)` per event until the stream ends or `signal`
 * aborts.
 */
export async function events(path, on, signal) {
  const r = await fetch(path, { headers: headers(token(), false), signal, cache: 'no-store' });
  if (!r.ok) throw await failure(r);
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true }).replace(/\r\n/g, '\n');
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length) on(name, JSON.parse(data.join('\n')));
    }
  }
}
