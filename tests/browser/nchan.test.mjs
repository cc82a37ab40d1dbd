// An existing nchan client keeps working: the `nchan` npm package's NchanSubscriber (long-poll
// transport) in a real browser, against comet, from another origin (CORS). Run:
// node tests/browser/nchan.test.mjs (after cargo build --release and npm ci).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { launch, shot, startComet, resp, until, sleep, ROOT } from './lib.mjs';

const TOKEN = 's3cret-token';
const NCHAN_JS = readFileSync(path.join(ROOT, 'tests/browser/node_modules/nchan/NchanSubscriber.js'));
let comet, browser, server, pageOrigin;

function page() {
  return `<!doctype html><meta charset="utf-8"><title>NchanSubscriber against comet</title>
<script src="/NchanSubscriber.js"></script>
<pre id="log"></pre>
<script>
  window.got = [];
  window.errors = [];
  var sub = new NchanSubscriber('http://${comet.browser}/sub/goods', { subscriber: 'longpoll', reconnectTimeout: 200 });
  sub.on('message', function (msg, meta) {
    got.push({ msg: msg, id: meta.id });
    document.getElementById('log').textContent += msg + '\\n';
  });
  sub.on('error', function (code, text) { errors.push(code); });
  sub.start();
</script>`;
}

before(async () => {
  server = http.createServer((req, res) => {
    if (req.url === '/NchanSubscriber.js') {
      res.writeHead(200, { 'Content-Type': 'application/javascript' });
      return res.end(NCHAN_JS);
    }
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' });
    res.end(page());
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  pageOrigin = `http://127.0.0.1:${server.address().port}`;
  comet = await startComet(`[log]
level = "info"
[browser]
listen = "127.0.0.1:0"
poll_timeout_secs = 2
allowed_origins = ["${pageOrigin}"]
[control]
listen = "127.0.0.1:0"
[control.tokens]
php = "${TOKEN}"
[admin]
listen = "127.0.0.1:0"
`);
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await comet?.stop();
  server?.close();
});

const numsub = async () => (await resp(comet.control, TOKEN, 'PUBSUB', 'NUMSUB', 'goods'))[1];

test('NchanSubscriber (long-poll) receives every message in order, across hold timeouts', async () => {
  const p = await browser.newPage();
  p.on('pageerror', (e) => console.error('page error:', e));
  await p.goto(pageOrigin + '/');
  await until(async () => (await numsub()) >= 1, 5000, 'the subscriber holding a poll');
  for (let i = 0; i < 3; i++) await resp(comet.control, TOKEN, 'PUBLISH', 'goods', `bid ${i}`);
  await p.waitForFunction(() => window.got.length >= 3, null, { timeout: 5000 });
  // A hold timeout (408) in between: the client polls again with its cursor.
  await sleep(2600);
  await resp(comet.control, TOKEN, 'PUBLISH', 'goods', 'after a timeout');
  await p.waitForFunction(() => window.got.length >= 4, null, { timeout: 5000 });
  const got = await p.evaluate(() => window.got);
  assert.deepEqual(got.map((g) => g.msg), ['bid 0', 'bid 1', 'bid 2', 'after a timeout']);
  // Its message ids are "time:tag", built from our Last-Modified and Etag.
  for (const g of got) assert.match(g.id, /^\d+:\d+$/);
  await shot(p, 'nchan-subscriber');
});
