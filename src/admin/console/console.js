// The console's behaviour: who this browser is signed in as (from /session), the action forms
// (sent with the session's X-CSRF-Token: a page of another site can neither read it nor send
// it), "Check live", auto-refresh. The session itself is an HttpOnly cookie this script never
// sees, and no token is kept in the page. Everything shown from an answer goes in as text, or
// as the server's escaped HTML parsed inertly: nothing from the CRM becomes script.
'use strict';
(function () {
  const AUTO = 'pendo-sync.auto-refresh';
  let session = { signed_in: false };
  const csrf = () => (session.csrf ? { 'X-CSRF-Token': session.csrf } : {});

  async function loadSession() {
    try {
      const res = await fetch('/session', { credentials: 'same-origin' });
      if (res.ok) session = await res.json();
    } catch (_) { /* the page still reads */ }
    const state = document.getElementById('session-state');
    const link = document.getElementById('signin-link');
    const out = document.getElementById('signout');
    if (link) link.href = '/signin?next=' + encodeURIComponent(location.pathname + location.search);
    if (state) {
      state.textContent = session.signed_in
        ? 'signed in as ' + session.who + ' (' + session.role + ')'
        : 'not signed in: actions are refused';
    }
    if (link && session.signed_in) link.textContent = 'Sign in again';
    if (out) out.hidden = !(session.signed_in && session.via === 'session');
  }

  function say(out, ok, text) {
    if (!out) return;
    out.className = ok ? 'ok' : 'err';
    out.textContent = text;
  }

  async function refusal(res) {
    let text = '';
    try { text = (await res.json()).error || ''; } catch (_) { /* not JSON */ }
    if (res.status === 401) return 'refused: sign in with the operator token first (top right)';
    return 'refused (' + res.status + '): ' + text;
  }

  async function follow(id, out) {
    for (;;) {
      await new Promise((r) => setTimeout(r, 1000));
      const res = await fetch('/v1/resync/' + encodeURIComponent(id));
      if (!res.ok) { say(out, false, 'lost track of resync ' + id + ' (' + res.status + ')'); return; }
      const job = await res.json();
      const line = 'resync ' + id + ': ' + job.state + ', ' + job.records_read + ' records read, ' +
        job.changes + ' changes';
      say(out, job.state !== 'failed', job.state === 'failed' ? line + ': ' + (job.error || '') : line);
      if (job.state === 'done' || job.state === 'failed') return;
    }
  }

  async function act(form) {
    const out = form.querySelector('output');
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    const body = {};
    new FormData(form).forEach((v, k) => { if (v !== '') body[k] = v; });
    say(out, true, 'sending…');
    let res;
    try {
      res = await fetch(form.dataset.action, {
        method: 'POST',
        headers: Object.assign({ 'Content-Type': 'application/json' }, csrf()),
        body: JSON.stringify(body),
      });
    } catch (e) { say(out, false, 'failed: ' + e); return; }
    if (!res.ok) { say(out, false, await refusal(res)); return; }
    const answer = await res.json().catch(() => ({}));
    if (form.dataset.follow && answer.id) { say(out, true, 'resync ' + answer.id + ' queued'); follow(answer.id, out); return; }
    say(out, true, 'done');
    setTimeout(() => window.location.reload(), 600);
  }

  async function live(button) {
    const target = document.getElementById('live');
    target.textContent = 'reading the CRM and Pendo…';
    const res = await fetch(button.dataset.live);
    if (!res.ok) { target.textContent = await refusal(res); return; }
    // Parsed as a separate document: scripts in it never run, and the server escaped its text.
    const doc = new DOMParser().parseFromString(await res.text(), 'text/html');
    target.replaceChildren(...Array.from(doc.body.childNodes));
  }

  document.addEventListener('DOMContentLoaded', () => {
    loadSession();
    const signout = document.getElementById('signout');
    if (signout) {
      signout.addEventListener('click', async () => {
        await fetch('/signout', { method: 'POST', headers: csrf() });
        window.location.reload();
      });
    }
    document.querySelectorAll('form[data-action]').forEach((form) => {
      form.addEventListener('submit', (e) => { e.preventDefault(); act(form); });
    });
    document.querySelectorAll('button[data-live]').forEach((b) => b.addEventListener('click', () => live(b)));
    const auto = document.getElementById('auto-refresh');
    if (auto) {
      auto.checked = sessionStorage.getItem(AUTO) === '1';
      auto.addEventListener('change', () => sessionStorage.setItem(AUTO, auto.checked ? '1' : '0'));
      setInterval(() => { if (auto.checked) window.location.reload(); }, 10000);
    }
  });
}());
