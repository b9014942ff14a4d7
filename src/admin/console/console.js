// The console's behaviour: the admin token (typed once, kept in this tab's sessionStorage, sent
// only as `Authorization: Bearer` to this origin), the action forms, "Check live", auto-refresh.
// Everything shown from an answer goes in as text, or as the server's escaped HTML parsed
// inertly: nothing from the CRM becomes script.
'use strict';
(function () {
  const TOKEN = 'pendo-sync.admin-token';
  const AUTO = 'pendo-sync.auto-refresh';
  const token = () => sessionStorage.getItem(TOKEN) || '';
  const auth = () => ({ Authorization: 'Bearer ' + token() });

  function showTokenState() {
    const el = document.getElementById('token-state');
    if (el) el.textContent = token() ? 'token set for this tab' : 'no token: actions are refused';
  }

  function say(out, ok, text) {
    if (!out) return;
    out.className = ok ? 'ok' : 'err';
    out.textContent = text;
  }

  async function refusal(res) {
    let text = '';
    try { text = (await res.json()).error || ''; } catch (_) { /* not JSON */ }
    if (res.status === 401) return 'refused: type the admin token at the top right first';
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
        headers: Object.assign({ 'Content-Type': 'application/json' }, auth()),
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
    const res = await fetch(button.dataset.live, { headers: auth() });
    if (!res.ok) { target.textContent = await refusal(res); return; }
    // Parsed as a separate document: scripts in it never run, and the server escaped its text.
    const doc = new DOMParser().parseFromString(await res.text(), 'text/html');
    target.replaceChildren(...Array.from(doc.body.childNodes));
  }

  document.addEventListener('DOMContentLoaded', () => {
    const tokenForm = document.getElementById('token-form');
    if (tokenForm) {
      // Disabled in the HTML: usable only with this handler, which keeps it out of any URL.
      tokenForm.querySelectorAll('input, button').forEach((el) => { el.disabled = false; });
      tokenForm.addEventListener('submit', (e) => {
        e.preventDefault();
        const input = document.getElementById('token-input');
        const value = input.value.trim();
        if (value) sessionStorage.setItem(TOKEN, value); else sessionStorage.removeItem(TOKEN);
        input.value = '';
        showTokenState();
      });
    }
    showTokenState();
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
