// comet.js in a real browser against the real daemon: one daemon per run on ephemeral ports, a
// test page served from another origin (so CORS with credentials is exercised), chromium
// driven by playwright-core. Run: node tests/browser/client.test.mjs (after cargo build --release).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { createRequire } from 'node:module';
import path from 'node:path';
import { launch, shot, startComet, resp, until, get, sleep, ROOT } from './lib.mjs';

const TOKEN = 's3cret-token';
let comet, browser, server, pageOrigin;

function config(origin, addrs) {
  return `[log]
level = "debug"
[browser]
listen = "${addrs ? addrs.browser : '127.0.0.1:0'}"
poll_timeout_secs = 2
allowed_origins = ["${origin}"]
[control]
listen = "${addrs ? addrs.control : '127.0.0.1:0'}"
[control.tokens]
php = "${TOKEN}"
[admin]
listen = "${addrs ? addrs.admin : '127.0.0.1:0'}"
[presence]
grace_secs = 1
`;
}

const pub = (ch, msg) => resp(comet.control, TOKEN, 'PUBLISH', ch, msg);
const numsub = async (ch) => (await resp(comet.control, TOKEN, 'PUBSUB', 'NUMSUB', ch))[1];
// Waits until a poll is held on `ch` (a message published before is buffered and fetched by the
// next poll anyway; this is for tests that want the held path, or a client that came back).
const held = (ch) => until(async () => (await numsub(ch)) >= 1, 5000, `a poll held on ${ch}`);
// One INFO field, as a number.
const info = async (field) => Number(new RegExp(`^${field}:(\\d+)`, 'm').exec(await resp(comet.control, TOKEN, 'INFO'))[1]);
const streams = async () => ({ ws: await info('websocket_streams'), es: await info('eventsource_streams') });
const TRANSPORTS = ['websocket', 'eventsource', 'longpoll'];

// The page: loads comet.js from the daemon, and records every callback in window.events.
// `/?hide=WebSocket,EventSource` plays a browser without those (undefined before comet.js loads).
function pageHtml(url) {
  const hide = (new URL(url, 'http://x').searchParams.get('hide') || '').split(',').filter((n) => /^\w+$/.test(n));
  return `<!doctype html><meta charset="utf-8"><title>comet.js test</title>
<script>${hide.map((n) => `window.${n} = undefined;`).join(' ')}</script>
<script src="http://${comet.browser}/comet.js"></script>
<pre id="log"></pre>
<script>
  window.events = [];
  window.subs = {};
  function note(e) { events.push(e); document.getElementById('log').textContent += JSON.stringify(e) + '\\n'; }
  window.start = function (name, channel, opts) {
    opts = Object.assign({}, opts, {
      onMessage: function (data, meta) { note({ sub: name, kind: 'message', data: data, meta: meta }); },
      onError: function (status) { note({ sub: name, kind: 'error', status: status }); },
      onClose: function (status) { note({ sub: name, kind: 'close', status: status }); }
    });
    subs[name] = Comet.subscribe('http://${comet.browser}', channel, opts);
  };
</script>`;
}

before(async () => {
  server = http.createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' });
    res.end(pageHtml(req.url));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  pageOrigin = `http://127.0.0.1:${server.address().port}`;
  comet = await startComet(config(pageOrigin));
  browser = await launch();
});

after(async () => {
  if (browser) await browser.close();
  if (comet) await comet.stop();
  if (server) server.close();
});

async function newPage(cookie, query = '') {
  const ctx = await browser.newContext();
  if (cookie) {
    await ctx.addCookies([{ name: 'PHPSESSID', value: cookie, domain: '127.0.0.1', path: '/' }]);
  }
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error('page error:', e));
  await page.goto(pageOrigin + '/' + query);
  await page.waitForFunction(() => typeof window.Comet === 'object');
  return page;
}

const events = (page, sub, kind) =>
  page.evaluate(([s, k]) => window.events.filter((e) => e.sub === s && (!k || e.kind === k)), [sub, kind]);

async function waitEvents(page, sub, kind, n, ms = 5000) {
  await page.waitForFunction(([s, k, n]) =>
    window.events.filter((e) => e.sub === s && e.kind === k).length >= n, [sub, kind, n], { timeout: ms });
  return events(page, sub, kind);
}

test('the multipart parser reads comet and nchan batches', () => {
  const Comet = createRequire(import.meta.url)(path.join(ROOT, 'src/comet.js'));
  // comet: every part has its own cursor headers; bodies may hold CRLF and dashes.
  const ours = '--B\r\nLast-Modified: Fri, 27 Nov 2026 22:00:00 GMT\r\nEtag: 4\r\nX-Comet-Channel: goods\r\n' +
    'Content-Type: text/plain\r\nContent-Length: 9\r\n\r\nline\r\n--x\r\n--B\r\nEtag: 5\r\n\r\n{"a":1}\r\n--B--\r\n';
  const p = Comet._parseMultipart(ours, 'B');
  assert.equal(p.length, 2);
  assert.equal(p[0].body, 'line\r\n--x');
  assert.equal(p[0].headers['x-comet-channel'], 'goods');
  assert.equal(p[0].headers.etag, '4');
  assert.equal(p[1].body, '{"a":1}');
  // nchan: parts with a Content-Type only, or none at all; ids only on the response.
  const nchan = '--N\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--N\r\n\r\nsecond\r\n--N--\r\n';
  const q = Comet._parseMultipart(nchan, 'N');
  assert.deepEqual(q.map((x) => x.body), ['first', 'second']);
  assert.equal(q[0].headers['content-type'], 'text/plain');
  assert.deepEqual(Comet._cursorFrom('Fri, 27 Nov 2026 22:00:00 GMT', 'W/"3"'), { time: 1795816800, tag: 3 });
});

test('GET /comet.js is served with caching headers', async () => {
  const r = await get(`http://${comet.browser}/comet.js`);
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type'), /javascript/);
  assert.match(r.headers.get('cache-control'), /max-age=\d+/);
  assert.match(r.text, /Comet\.subscribe|subscribe: function/);
});

test('buffered messages come as one batch, then live ones, with channel and ids', async () => {
  for (const m of ['m1', 'm2', 'm3']) await pub('goods', m);
  const page = await newPage();
  await page.evaluate(() => start('g', 'goods', { transport: 'longpoll' }));
  let got = await waitEvents(page, 'g', 'message', 3);
  assert.deepEqual(got.map((e) => e.data), ['m1', 'm2', 'm3']);
  assert.ok(got.every((e) => e.meta.channel === 'goods'));
  assert.deepEqual(got.map((e) => e.meta.batch && e.meta.batch.size), [3, 3, 3], 'multipart batch');
  const ids = got.map((e) => [e.meta.time, e.meta.tag]);
  for (let i = 1; i < ids.length; i++) {
    assert.ok(ids[i][0] > ids[i - 1][0] || (ids[i][0] === ids[i - 1][0] && ids[i][1] > ids[i - 1][1]), 'ids increase');
  }
  await held('goods');
  assert.equal(await pub('goods', 'm4 é ✓'), 1, 'delivered to the held poll');
  got = await waitEvents(page, 'g', 'message', 4);
  assert.equal(got[3].data, 'm4 é ✓');
  assert.equal(got[3].meta.batch, null);
  // Held past poll_timeout_secs (2 s): the 408 is followed by a new poll, not an error.
  await sleep(2600);
  await held('goods');
  assert.equal(await pub('goods', 'm5'), 1);
  got = await waitEvents(page, 'g', 'message', 5);
  assert.equal(got[4].data, 'm5');
  assert.deepEqual(await events(page, 'g', 'error'), []);
  await shot(page, 'client-01-goods');
  await page.context().close();
});

test('without multipart, a client behind gets one message per poll, in order', async () => {
  for (const m of ['s1', 's2', 's3']) await pub('single', m);
  const page = await newPage();
  await page.evaluate(() => start('s', 'single', { transport: 'longpoll', multipart: false, cursorIn: 'query' }));
  const got = await waitEvents(page, 's', 'message', 3);
  assert.deepEqual(got.map((e) => e.data), ['s1', 's2', 's3']);
  assert.ok(got.every((e) => e.meta.batch === null));
  await page.context().close();
});

test('@me over long-poll: private messages, joined channels, 410 on SESSION.CLOSE, then 403', async () => {
  assert.equal(await resp(comet.control, TOKEN, 'SESSION.OPEN', 'sidA', 'alice'), 'OK');
  const page = await newPage('sidA');
  await page.evaluate(() => start('me', '@me', { json: true, transport: 'longpoll' }));
  await pub('session:sidA', '{"text":"hi alice"}');
  let got = await waitEvents(page, 'me', 'message', 1);
  assert.deepEqual(got[0].data, { text: 'hi alice' });
  assert.equal(got[0].meta.channel, 'session:sidA');
  assert.equal(got[0].meta.subscription, '@me');
  assert.equal(await resp(comet.control, TOKEN, 'JOIN', 'sidA', 'auction'), 1);
  await pub('auction', '{"price":5}');
  got = await waitEvents(page, 'me', 'message', 2);
  assert.equal(got[1].meta.channel, 'auction');
  // Another session's private channel is refused.
  await page.evaluate(() => start('other', 'session:sidB', {}));
  assert.equal((await waitEvents(page, 'other', 'close', 1))[0].status, 403);
  await sleep(300); // let the page poll again after the last message, so the close answers a held poll
  assert.equal(await resp(comet.control, TOKEN, 'SESSION.CLOSE', 'sidA'), 1);
  assert.equal((await waitEvents(page, 'me', 'close', 1))[0].status, 410);
  await page.evaluate(() => start('me2', '@me', {}));
  assert.equal((await waitEvents(page, 'me2', 'close', 1))[0].status, 403);
  await shot(page, 'client-02-me-closed');
  await page.context().close();
});

test('persist: a reload resumes after the last message seen', async () => {
  for (const m of ['n1', 'n2']) await pub('news', m);
  const page = await newPage();
  await page.evaluate(() => start('n', 'news', { persist: true }));
  await waitEvents(page, 'n', 'message', 2);
  await page.reload();
  await page.waitForFunction(() => typeof window.Comet === 'object');
  await page.evaluate(() => start('n', 'news', { persist: true }));
  await held('news');
  await pub('news', 'n3');
  const got = await waitEvents(page, 'n', 'message', 1);
  await sleep(200);
  assert.deepEqual((await events(page, 'n', 'message')).map((e) => e.data), ['n3'], 'no replay after reload');
  // Without persist the page starts from the oldest buffered message.
  await page.evaluate(() => start('fresh', 'news', {}));
  assert.deepEqual((await waitEvents(page, 'fresh', 'message', 3)).map((e) => e.data), ['n1', 'n2', 'n3']);
  assert.equal(got.length, 1);
  await page.context().close();
});

test('a daemon restart: errors, backoff, then the stream goes on', async () => {
  const page = await newPage();
  await page.evaluate(() => start('r', 'restart', { retryMin: 200, retryMax: 1000 }));
  await pub('restart', 'before');
  await waitEvents(page, 'r', 'message', 1);
  const addrs = { browser: comet.browser, control: comet.control, admin: comet.admin };
  assert.equal(await comet.stop(), 0, 'clean exit on SIGTERM');
  const errs = await waitEvents(page, 'r', 'error', 1);
  assert.ok([0, 503].includes(errs[0].status), `error status ${errs[0].status}`);
  await sleep(500);
  comet = await startComet(config(pageOrigin, addrs));
  await held('restart');
  assert.equal(await pub('restart', 'after'), 1, 'the client came back');
  const got = await waitEvents(page, 'r', 'message', 2);
  assert.equal(got[1].data, 'after');
  await shot(page, 'client-03-restart');
  await page.context().close();
});

test('a poll unanswered past `timeout` is replaced at once, without an error', async () => {
  const page = await newPage();
  // poll_timeout_secs is 2: a 700 ms client timeout cuts every poll short.
  await page.evaluate(() => start('t', 'slow', { transport: 'longpoll', timeout: 700 }));
  await sleep(1800);
  await held('slow');
  await pub('slow', 'still here');
  const got = await waitEvents(page, 't', 'message', 1);
  assert.equal(got[0].data, 'still here');
  assert.deepEqual(await events(page, 't', 'error'), []);
  await page.context().close();
});

test('stop() ends polling', async () => {
  const page = await newPage();
  await page.evaluate(() => start('x', 'stopped', {}));
  await held('stopped');
  await page.evaluate(() => subs.x.stop());
  await until(async () => (await numsub('stopped')) === 0, 3000, 'the poll to end');
  await pub('stopped', 'late');
  await sleep(300);
  assert.deepEqual(await events(page, 'x'), []);
  await page.context().close();
});


// --- streams: WebSocket and EventSource ---------------------------------------------------------

for (const transport of TRANSPORTS) {
  test(`transport '${transport}' gets a burst in order, with the daemon's ids`, async () => {
    const ch = `burst-${transport}`;
    const page = await newPage();
    await page.evaluate(([ch, t]) => start('b', ch, { transport: t }), [ch, transport]);
    await held(ch);
    assert.equal(await page.evaluate(() => subs.b.transport), transport);
    const sent = ['b1', 'two\nlines', 'b3 é ✓', '', 'b5'];
    for (const m of sent) await pub(ch, m);
    const got = await waitEvents(page, 'b', 'message', sent.length);
    assert.deepEqual(got.map((e) => e.data), sent);
    assert.ok(got.every((e) => e.meta.channel === ch && e.meta.subscription === ch));
    assert.ok(got.every((e) => e.meta.id === `${e.meta.time}:${e.meta.tag}`));
    if (transport !== 'eventsource') assert.ok(got.every((e) => e.meta.contentType.startsWith('text/plain')));
    // Each id is the daemon's: a poll after it answers with the next message.
    for (let i = 0; i + 1 < got.length; i++) {
      const r = await get(`http://${comet.browser}/sub/${ch}?last_event_id=${got[i].meta.id}`);
      assert.equal(r.status, 200);
      assert.equal(r.text, sent[i + 1], `the message after ${got[i].meta.id}`);
    }
    assert.equal(await page.evaluate(() => subs.b.lastId()), got[got.length - 1].meta.id);
    assert.deepEqual(await events(page, 'b', 'error'), []);
    await page.context().close();
  });
}

test('WebSocket URLs: http -> ws, https -> wss, relative bases resolved against the page', async () => {
  const page = await newPage();
  const host = new URL(pageOrigin).host;
  assert.deepEqual(await page.evaluate(() => [
    Comet._wsUrl('http://push.site.com/sub/a'), Comet._wsUrl('https://push.site.com/push/sub/a?k=1'),
    Comet._wsUrl('/push/sub/a'), Comet._wsUrl('/sub/a'), Comet._wsUrl('//other:81/sub/a'),
  ]), ['ws://push.site.com/sub/a', 'wss://push.site.com/push/sub/a?k=1',
    `ws://${host}/push/sub/a`, `ws://${host}/sub/a`, 'ws://other:81/sub/a']);
  await page.context().close();
});

test('the default transport is WebSocket', async () => {
  const page = await newPage();
  await page.evaluate(() => start('d', 'dflt', {}));
  await until(async () => (await streams()).ws === 1, 5000, 'websocket_streams:1');
  assert.deepEqual(await streams(), { ws: 1, es: 0 });
  assert.equal(await page.evaluate(() => subs.d.transport), 'websocket');
  assert.equal(await pub('dflt', 'hello'), 1);
  assert.equal((await waitEvents(page, 'd', 'message', 1))[0].data, 'hello');
  await page.context().close();
  await until(async () => (await streams()).ws === 0, 5000, 'the stream closed with the page');
});

test('without WebSocket the client uses EventSource; without both, long-poll', async () => {
  let page = await newPage(null, '?hide=WebSocket');
  await page.evaluate(() => start('f', 'fallback', {}));
  await until(async () => (await streams()).es === 1, 5000, 'eventsource_streams:1');
  assert.deepEqual(await streams(), { ws: 0, es: 1 });
  assert.equal(await page.evaluate(() => subs.f.transport), 'eventsource');
  await pub('fallback', 'over es');
  assert.equal((await waitEvents(page, 'f', 'message', 1))[0].data, 'over es');
  await page.context().close();
  await until(async () => (await streams()).es === 0, 5000, 'the event stream closed with the page');

  page = await newPage(null, '?hide=WebSocket,EventSource');
  await page.evaluate(() => start('f', 'fallback2', {}));
  await held('fallback2');
  assert.deepEqual(await streams(), { ws: 0, es: 0 });
  assert.equal(await page.evaluate(() => subs.f.transport), 'longpoll');
  await pub('fallback2', 'over long-poll');
  assert.equal((await waitEvents(page, 'f', 'message', 1))[0].data, 'over long-poll');
  await page.context().close();
});

test('a stream that cannot connect gives way to the next transport', async () => {
  // A private channel of another session: WebSocket and EventSource are refused before they
  // open (the browser shows no status), long-poll then gets the 403 and reports it.
  const page = await newPage();
  await page.evaluate(() => start('p', 'session:nobody', {}));
  assert.equal((await waitEvents(page, 'p', 'close', 1))[0].status, 403);
  assert.equal(await page.evaluate(() => subs.p.transport), 'longpoll');
  assert.deepEqual(await events(page, 'p', 'error'), []);
  await page.context().close();
});

test('streams that never open give way after openTimeout', async () => {
  // A stand-in for a proxy that swallows upgrades and buffers event streams: it holds both
  // without a word, and answers polls 403.
  const hung = [];
  const stub = http.createServer((req, res) => {
    if (/event-stream/.test(req.headers.accept || '')) { hung.push(res); return; }
    res.writeHead(403, { 'Access-Control-Allow-Origin': pageOrigin, 'Access-Control-Allow-Credentials': 'true' });
    res.end('no');
  });
  stub.on('upgrade', (req, sock) => hung.push(sock));
  await new Promise((r) => stub.listen(0, '127.0.0.1', r));
  const page = await newPage();
  const t0 = Date.now();
  await page.evaluate((base) => {
    subs.h = Comet.subscribe(base, 'goods', {
      openTimeout: 400,
      onClose: function (status) { window.events.push({ sub: 'h', kind: 'close', status: status }); },
      onError: function (status) { window.events.push({ sub: 'h', kind: 'error', status: status }); },
    });
  }, `http://127.0.0.1:${stub.address().port}`);
  assert.equal((await waitEvents(page, 'h', 'close', 1))[0].status, 403);
  assert.ok(Date.now() - t0 >= 800, 'both streams waited out openTimeout');
  assert.deepEqual(await events(page, 'h', 'error'), []);
  assert.equal(hung.length, 2, 'one WebSocket and one EventSource tried');
  await page.context().close();
  for (const h of hung) h.destroy();
  stub.close();
});

for (const transport of TRANSPORTS) {
  test(`transport '${transport}': a new subscription from lastId() gets exactly the missed messages`, async () => {
    const ch = `resume-${transport}`;
    const page = await newPage();
    await page.evaluate(([ch, t]) => start('r', ch, { transport: t }), [ch, transport]);
    await held(ch);
    for (const m of ['r1', 'r2']) await pub(ch, m);
    await waitEvents(page, 'r', 'message', 2);
    const last = await page.evaluate(() => { subs.r.stop(); return subs.r.lastId(); });
    await until(async () => (await numsub(ch)) === 0, 3000, 'the subscription to end');
    for (const m of ['r3', 'r4']) await pub(ch, m);
    await page.evaluate(([ch, t, since]) => start('r2', ch, { transport: t, since }), [ch, transport, last]);
    await waitEvents(page, 'r2', 'message', 2);
    await sleep(300);
    assert.deepEqual((await events(page, 'r2', 'message')).map((e) => e.data), ['r3', 'r4']);
    // start() again on the stopped one resumes the same way.
    await page.evaluate(() => subs.r.start());
    await waitEvents(page, 'r', 'message', 4);
    await sleep(300);
    assert.deepEqual((await events(page, 'r', 'message')).map((e) => e.data), ['r1', 'r2', 'r3', 'r4']);
    await page.context().close();
  });
}

test('WebSocket: deleting the channel calls onClose(410) and stops', async () => {
  const page = await newPage();
  await page.evaluate(() => start('del', 'doomed', { transport: 'websocket' }));
  await until(async () => (await streams()).ws === 1, 5000, 'websocket_streams:1');
  await pub('doomed', 'last words');
  await waitEvents(page, 'del', 'message', 1);
  const r = await fetch(`http://${comet.admin}/pub?id=doomed`, { method: 'DELETE', headers: { Authorization: `Bearer ${TOKEN}` } });
  assert.equal(r.status, 200);
  assert.equal((await waitEvents(page, 'del', 'close', 1))[0].status, 410);
  assert.equal(await page.evaluate(() => subs.del.running), false);
  assert.deepEqual(await events(page, 'del', 'error'), []);
  await sleep(300);
  assert.equal(await numsub('doomed'), 0, 'no reconnect after 410');
  await page.context().close();
});

test('EventSource: deleting the channel calls onClose(410) and stops', async () => {
  const page = await newPage();
  await page.evaluate(() => start('del', 'doomed-es', { transport: 'eventsource' }));
  await until(async () => (await streams()).es === 1, 5000, 'eventsource_streams:1');
  await pub('doomed-es', 'x');
  await waitEvents(page, 'del', 'message', 1);
  const r = await fetch(`http://${comet.admin}/pub?id=doomed-es`, { method: 'DELETE', headers: { Authorization: `Bearer ${TOKEN}` } });
  assert.equal(r.status, 200);
  assert.equal((await waitEvents(page, 'del', 'close', 1))[0].status, 410);
  assert.deepEqual(await events(page, 'del', 'error'), []);
  await page.context().close();
});

test('@me over WebSocket: joined channels in meta.channel, 410 on SESSION.CLOSE, then 403', async () => {
  assert.equal(await resp(comet.control, TOKEN, 'SESSION.OPEN', 'sidW', 'wendy'), 'OK');
  const page = await newPage('sidW');
  await page.evaluate(() => start('me', '@me', { json: true }));
  await until(async () => (await streams()).ws === 1, 5000, 'websocket_streams:1');
  assert.equal(await page.evaluate(() => subs.me.transport), 'websocket');
  await pub('session:sidW', '{"text":"hi wendy"}');
  let got = await waitEvents(page, 'me', 'message', 1);
  assert.deepEqual(got[0].data, { text: 'hi wendy' });
  assert.equal(got[0].meta.channel, 'session:sidW');
  assert.equal(got[0].meta.subscription, '@me');
  assert.equal(await resp(comet.control, TOKEN, 'JOIN', 'sidW', 'lobby'), 1);
  await pub('lobby', '{"n":1}');
  got = await waitEvents(page, 'me', 'message', 2);
  assert.equal(got[1].meta.channel, 'lobby');
  assert.deepEqual(got[1].data, { n: 1 });
  assert.equal(await resp(comet.control, TOKEN, 'SESSION.CLOSE', 'sidW'), 1);
  assert.equal((await waitEvents(page, 'me', 'close', 1))[0].status, 410);
  // A new one: the WebSocket is refused, EventSource is skipped on @me, long-poll says 403.
  await page.evaluate(() => start('me2', '@me', {}));
  assert.equal((await waitEvents(page, 'me2', 'close', 1))[0].status, 403);
  assert.deepEqual(await page.evaluate(() => subs.me2.transports), ['websocket', 'longpoll']);
  await page.context().close();
});

test('@me skips EventSource: without WebSocket it is long-poll', async () => {
  assert.equal(await resp(comet.control, TOKEN, 'SESSION.OPEN', 'sidE', 'eve'), 'OK');
  const page = await newPage('sidE', '?hide=WebSocket');
  await page.evaluate(() => start('me', '@me', { transport: ['eventsource', 'longpoll'] }));
  await until(async () => (await info('held_polls')) === 1, 5000, 'held_polls:1');
  assert.equal(await page.evaluate(() => subs.me.transport), 'longpoll');
  assert.deepEqual(await streams(), { ws: 0, es: 0 });
  await pub('session:sidE', 'hi eve');
  assert.equal((await waitEvents(page, 'me', 'message', 1))[0].data, 'hi eve');
  await page.context().close();
  await resp(comet.control, TOKEN, 'SESSION.CLOSE', 'sidE');
});

test('WebSocket after a daemon restart: drops retry, and a refused reopen on @me is onClose(403)', async () => {
  assert.equal(await resp(comet.control, TOKEN, 'SESSION.OPEN', 'sidR', 'rita'), 'OK');
  const page = await newPage('sidR');
  await page.evaluate(() => start('me', '@me', { retryMin: 200, retryMax: 1000 }));
  await page.evaluate(() => start('pub', 'after-restart', { retryMin: 200, retryMax: 1000 }));
  await until(async () => (await streams()).ws === 2, 5000, 'websocket_streams:2');
  const addrs = { browser: comet.browser, control: comet.control, admin: comet.admin };
  assert.equal(await comet.stop(), 0);
  const errs = await waitEvents(page, 'me', 'error', 1);
  assert.equal(errs[0].status, 503, 'the Close frame said 503 shutting down');
  await sleep(500);
  comet = await startComet(config(pageOrigin, addrs));
  // Sessions live in memory: the restarted daemon refuses @me; the stream cannot say so, the
  // probe poll can.
  assert.equal((await waitEvents(page, 'me', 'close', 1, 8000))[0].status, 403);
  // A public channel comes back on its WebSocket.
  await until(async () => (await streams()).ws === 1, 8000, 'the WebSocket back');
  assert.equal(await page.evaluate(() => subs.pub.transport), 'websocket');
  await pub('after-restart', 'back');
  assert.equal((await waitEvents(page, 'pub', 'message', 1))[0].data, 'back');
  await page.context().close();
});
