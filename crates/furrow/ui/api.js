// The API client: the bearer token (this tab's sessionStorage only, never
// a cookie, never a URL), who is signed in and with which role.

import { setSkew } from './dom.js';

const KEY = 'furrow.token';

export const session = {
  token: sessionStorage.getItem(KEY), // null: signed out; '' : a gateway without a token
  role: null, // read | operate | admin; null: unknown (a gateway without /v1/overview)
  actor: null,
  instance: null,
  overview: null, // the last GET /v1/overview and when
  overviewAt: 0,
  hasOverview: true,
};

export function signIn(token) {
  sessionStorage.setItem(KEY, token);
  session.token = token;
}
export function signOut() {
  sessionStorage.removeItem(KEY);
  Object.assign(session, { token: null, role: null, actor: null, instance: null, overview: null, overviewAt: 0 });
}

let onUnauthorized = () => {};
export const setUnauthorizedHandler = (f) => { onUnauthorized = f; };
let onWho = () => {};
export const setWhoHandler = (f) => { onWho = f; };

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * One API call. `body` is sent as JSON; the answer's JSON is returned
 * (`{data, res}` with `full`). Errors throw ApiError with the API's
 * `{"error": {"code", "message"}}`; a 401 also signs out.
 */
export async function api(path, { method = 'GET', body, headers = {}, signal, full = false, type = 'application/json' } = {}) {
  const hd = { Accept: 'application/json', ...headers };
  if (session.token) hd.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) hd['Content-Type'] = type;
  let res;
  try {
    res = await fetch(path, {
      method, headers: hd, signal, cache: 'no-store', credentials: 'omit', redirect: 'error',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'cannot reach the gateway');
  }
  const text = await res.text();
  let data = null;
  if (text) { try { data = JSON.parse(text); } catch { data = text; } }
  if (!res.ok) {
    const err = data && typeof data === 'object' ? data.error : null;
    const msg = (typeof err === 'string' ? err : err?.message) || (typeof data === 'string' && data.length < 200 ? data : '') || res.statusText || 'request failed';
    const e = new ApiError(res.status, err?.code || '', msg);
    if (res.status === 401) { e.handled = true; onUnauthorized(); }
    throw e;
  }
  return full ? { data, res } : data;
}

/** `/v1/x/{a}/y` with each segment encoded, plus a query (arrays repeat). */
export function path(parts, query = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    for (const x of [].concat(v)) if (x != null && x !== '') q.append(k, String(x));
  }
  const p = `/v1/${parts.map((x) => encodeURIComponent(x)).join('/')}`;
  const qs = q.toString();
  return qs ? `${p}?${qs}` : p;
}

/**
 * GET /v1/overview, which also says who is asking. A gateway without it
 * (404) still signs in: the token is checked with GET /v1/storage and the
 * role stays unknown (controls shown; the API refuses what it must).
 */
export async function loadOverview(signal) {
  try {
    const o = await api('/v1/overview', { signal });
    session.hasOverview = true;
    session.overview = o;
    session.overviewAt = Date.now();
    session.role = o?.role ?? null;
    session.actor = o?.actor ?? null;
    session.instance = o?.instance ?? null;
    if (typeof o?.now_ms === 'number') setSkew(o.now_ms - Date.now());
    onWho();
    return o;
  } catch (e) {
    if (e.status !== 404) throw e;
    session.hasOverview = false;
    session.role = null;
    await api('/v1/storage', { signal });
    onWho();
    return null;
  }
}

const RANK = { read: 1, operate: 2, admin: 3 };
/** May the caller do what needs `role`? Unknown roles are let through: the API decides. */
export function can(role) {
  const r = RANK[session.role];
  return r === undefined ? true : r >= RANK[role];
}
