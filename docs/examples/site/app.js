// The auction page's live parts, on comet.js. Two long polls per page:
//   goods  the shared channel: every bid, for every visitor;
//   @me    this session's private stream: private messages (published on session:<sid>) and the
//          "who is online" list (presence:goods, which login.php JOINed to the session).
(function () {
  'use strict';
  var $ = function (id) { return document.getElementById(id); };
  var SITE = window.SITE;
  var subs = [];

  function status(state, text) {
    var s = $('status');
    s.dataset.state = state;
    s.textContent = text;
  }

  function li(text, attrs) {
    var el = document.createElement('li');
    el.textContent = text;
    for (var k in attrs || {}) el.setAttribute(k, attrs[k]);
    return el;
  }

  function time(at) { return new Date(at * 1000).toLocaleTimeString(); }

  function showBid(m) {
    $('price').textContent = m.price;
    $('bidder').textContent = m.bidder;
    $('bidder-line').hidden = false;
    var amount = $('amount');
    if (+amount.value <= m.price) amount.value = m.price + 10;
    $('bids').insertBefore(li(m.price + ' € by ' + m.bidder + ' at ' + time(m.at), { 'data-price': m.price }), $('bids').firstChild);
  }

  function showOnline(users) {
    var ul = $('online'), names = $('online-names');
    ul.textContent = '';
    names.textContent = '';
    users.forEach(function (u) {
      ul.appendChild(li(u, { 'data-user': u }));
      var o = document.createElement('option');
      o.value = u;
      names.appendChild(o);
    });
    $('online-count').textContent = users.length;
  }

  function showMessage(m) {
    $('inbox').insertBefore(li(m.from + ': ' + m.text, { 'data-from': m.from, title: time(m.at) }), $('inbox').firstChild);
  }

  function sessionEnded(code) {
    subs.forEach(function (s) { s.stop(); });
    status('ended', code === 410 ? 'Your session has ended (410): you are logged out.'
      : 'Your private stream was refused (' + code + '): log in again.');
    document.querySelectorAll('main input, main button').forEach(function (el) { el.disabled = true; });
    $('logout-form').hidden = true;
    var a = document.createElement('a');
    a.href = '/';
    a.id = 'relogin';
    a.textContent = ' Log in again';
    $('status').appendChild(a);
  }

  var common = {
    json: true,
    onError: function (code, sub, err, retryMs) {
      if (err) return console.warn('bad message on', sub.channel, err);
      status('retrying', 'Connection lost (' + code + '), retrying in ' + (retryMs / 1000).toFixed(1) + ' s…');
    }
  };
  function live() { if ($('status').dataset.state !== 'ended') status('live', 'live'); }

  subs.push(Comet.subscribe(SITE.push, 'goods', Object.assign({}, common, {
    onMessage: function (m) { live(); if (m.type === 'bid') showBid(m); },
    onClose: function (code) { status('ended', 'The auction channel closed (' + code + ').'); }
  })));
  // 403 on @me: either the session was closed elsewhere (logout in another tab), or comet was
  // restarted and forgot open sessions. PHP knows which: ask it to open the stream again, at
  // most once a minute, and go on where the stream was.
  var reopened = 0;
  function refused(code, sub) {
    if (code !== 403 || Date.now() - reopened < 60000) return sessionEnded(code);
    reopened = Date.now();
    fetch('/reopen.php', { method: 'POST', headers: { Accept: 'application/json' } })
      .then(function (r) {
        if (!r.ok) return sessionEnded(code);
        sub.start();
        // Presence changes published while the stream was not joined are lost to it: the list
        // as of now comes from PHP, later changes by push again.
        return fetch('/online.php').then(function (r) { return r.json(); })
          .then(function (j) { showOnline(j.users); });
      })
      .catch(function () { sessionEnded(code); });
  }

  subs.push(Comet.subscribe(SITE.push, '@me', Object.assign({}, common, {
    // Per login: a reload resumes after the last message seen; a new login starts afresh.
    persist: 'login-' + SITE.login,
    onMessage: function (m, meta) {
      live();
      if (meta.channel === 'presence:goods') showOnline(m.users);
      else if (m.type === 'message') showMessage(m);
    },
    onClose: refused
  })));
  // Polls are held until something happens: say "live" once both had a moment to connect.
  setTimeout(function () { if ($('status').dataset.state === 'starting') live(); }, 500);

  // Forms post with fetch; the answers come back to every page through comet, this page included.
  function post(form, resultId, done) {
    form.addEventListener('submit', function (ev) {
      ev.preventDefault();
      var out = resultId && $(resultId);
      fetch(form.action, { method: 'POST', body: new FormData(form), headers: { Accept: 'application/json' } })
        .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, body: j }; }); })
        .then(function (r) {
          if (out) {
            out.textContent = r.ok ? '' : r.body.error;
            out.classList.toggle('ok', r.ok);
          }
          if (r.ok && done) done(r.body);
        })
        .catch(function (e) { if (out) out.textContent = String(e); });
    });
  }
  post($('bid-form'), 'bid-result');
  post($('message-form'), 'send-result', function (r) {
    $('send-result').textContent = 'sent to ' + r.to;
    $('text').value = '';
  });
  // Logging out closes the private stream: the @me poll is answered 410 and sessionEnded() runs.
  post($('logout-form'), null);
})();
