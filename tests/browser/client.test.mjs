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

// The page: loads comet.js from the daemon, and records every callback in window.events.
function pageHtml() {
  return `<!doctype html><meta charset="utf-8"><title>comet.js test</title>
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
    res.end(pageHtml());
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

async function newPage(cookie) {
  const ctx = await browser.newContext();
  if (cookie) {
    await ctx.addCookies([{ name: 'PHPSESSID', value: cookie, domain: '127.0.0.1', path: '/' }]);
  }
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error('page error:', e));
  await page.goto(pageOrigin + '/');
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
  await page.evaluate(() => start('g', 'goods', {}));
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
  await page.evaluate(() => start('s', 'single', { multipart: false, cursorIn: 'query' }));
  const got = await waitEvents(page, 's', 'message', 3);
  assert.deepEqual(got.map((e) => e.data), ['s1', 's2', 's3']);
  assert.ok(got.every((e) => e.meta.batch === null));
  await page.context().close();
});

test('@me: private messages, joined channels, 410 on SESSION.CLOSE, then 403', async () => {
  assert.equal(await resp(comet.control, TOKEN, 'SESSION.OPEN', 'sidA', 'alice'), 'OK');
  const page = await newPage('sidA');
  await page.evaluate(() => start('me', '@me', { json: true }));
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
  await page.evaluate(() => start('t', 'slow', { timeout: 700 }));
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

