// Furrow console: sign-in, the header, and hash routing to the pages.
// No build step: plain ES modules, served by the gateway at /ui/.

import { $, h, page, announce, clearAnnounce, report } from './dom.js';
import { session, signIn, signOut, loadOverview, setUnauthorizedHandler, setWhoHandler } from './api.js';
// Each page is its own module, loaded the first time it is shown.
const ROUTES = [
  [/^\/?$/, () => import('./overview.js'), 'render', 'overview'],
  [/^\/devices\/?$/, () => import('./devices.js'), 'render', 'devices'],
  [/^\/devices\/(.+)$/, () => import('./device.js'), 'render', 'devices'],
  [/^\/jobs\/?$/, () => import('./jobs.js'), 'renderList', 'jobs'],
  [/^\/jobs\/(\d+)$/, () => import('./jobs.js'), 'renderJob', 'jobs'],
  [/^\/firmware\/?$/, () => import('./firmware.js'), 'render', 'firmware'],
];

let current = null; // the page's AbortController: stops its requests and timers

function stopView() {
  current?.abort();
  current = null;
  $('view').replaceChildren();
}

function showWho() {
  const signedIn = session.token !== null;
  $('nav').hidden = $('who').hidden = !signedIn;
  $('readonly-note').hidden = !(signedIn && session.role === 'read');
  const who = [session.actor, session.role && `role ${session.role}`, session.instance && `on ${session.instance}`].filter(Boolean).join(' · ');
  $('who-text').textContent = who || 'Signed in';
}

function showSignin(focus) {
  stopView();
  showWho();
  document.title = 'Sign in · Furrow';
  $('signin').hidden = false;
  if (focus) $('signin-token').focus();
}

function route(focus) {
  if (session.token === null) { showSignin(false); return; }
  $('signin').hidden = true;
  let p = location.hash.replace(/^#/, '');
  if (!p.startsWith('/')) p = '/';
  let load = null, fn = '', params = [], nav = '';
  for (const [re, l, f, n] of ROUTES) {
    const m = p.match(re);
    if (m) {
      try { params = m.slice(1).map(decodeURIComponent); load = l; fn = f; nav = n; } catch { /* bad escape: not found */ }
      break;
    }
  }
  stopView();
  clearAnnounce();
  const ctrl = new AbortController();
  current = ctrl;
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === nav) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  const view = $('view');
  if (!load) {
    view.append(page('Page not found'), h('p', null, h('a', { href: '#/', text: 'Go to the overview' })));
    if (focus) view.querySelector('h1').focus();
    return;
  }
  const t0 = performance.now();
  load().then((mod) => {
    if (ctrl.signal.aborted) return undefined;
    // Each page puts its heading in before its first await: focus it.
    const done = mod[fn]({ view, signal: ctrl.signal, params });
    if (focus) view.querySelector('h1')?.focus();
    return done;
  }).then(() => {
    // A page's render resolves once its first data is drawn: "furrow:view"
    // marks that moment (its startTime counts from the page load), for
    // examples/console_load.rs's time to first view.
    if (!ctrl.signal.aborted) performance.mark('furrow:view', { detail: { page: nav, route_ms: performance.now() - t0 } });
  }).catch((e) => { if (!ctrl.signal.aborted) report(e); });
}

async function submitSignin(e) {
  e.preventDefault();
  const input = $('signin-token'), btn = $('signin-form').querySelector('button');
  signIn(input.value.trim());
  btn.disabled = true;
  let failed = null;
  try {
    await loadOverview();
  } catch (err) {
    // Only a 401 refuses the token (and is handled); anything else (503,
    // network) is told, and the console opens.
    if (err.handled) return;
    failed = err;
  } finally {
    btn.disabled = false;
  }
  input.value = '';
  showWho();
  route(true);
  if (failed) report(failed, 'Signed in, but the gateway did not answer');
  else announce(session.role === 'read' ? 'Signed in. Your token can only read.' : 'Signed in.', 'ok');
}

function start() {
  setWhoHandler(showWho);
  setUnauthorizedHandler(() => {
    const was = session.token;
    signOut();
    showSignin(true);
    announce(was ? 'The gateway refused the token (401): it is wrong, revoked or expired. Sign in again.' : 'This gateway needs a token (401): sign in with one.', 'error');
  });
  $('signin-form').addEventListener('submit', submitSignin);
  $('signout').addEventListener('click', () => {
    signOut();
    showSignin(true);
    announce('Signed out: the token is forgotten.', 'ok');
  });
  $('announce-close').addEventListener('click', clearAnnounce);
  $('skip').addEventListener('click', (e) => { e.preventDefault(); $('main').focus(); });
  window.addEventListener('hashchange', () => route(true));
  if (session.token === null) { showSignin(true); return; }
  // Who is signed in (and with which role) before the first page draws its controls.
  loadOverview()
    .catch((e) => report(e, 'Cannot reach the gateway'))
    .finally(() => { showWho(); if (session.token !== null) route(false); });
}

start();
