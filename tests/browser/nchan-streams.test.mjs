// nchan's own client over the streaming transports: the `nchan` npm package's NchanSubscriber in
// Chromium, behind nginx at /push (the shipped example's /push location: Upgrade passed on,
// proxy_buffering off), forced to websocket, then to eventsource, then on its defaults (which
// pick websocket). Each gets a burst complete and in order, reads a private channel, and resumes
// after nginx is stopped and started again without loss or duplicates. Run:
// node tests/browser/nchan-streams.test.mjs (after cargo build --release and npm ci).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync, mkdtempSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { launch, shot, startComet, resp, until, sleep, ROOT, nchanPages } from './lib.mjs';

const TOKEN = 's3cret-token';
const NGINX = process.env.NGINX || '/usr/sbin/nginx';
let comet, browser, pages, nginx, nginxPort, origin;

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

/** The shipped example's /push location, the page server behind `/`. */
function nginxConf(dir, pagePort) {
  const example = readFileSync(path.join(ROOT, 'docs/examples/site/nginx.conf'), 'utf8');
  const push = /location \/push\/ \{[\s\S]*?\n        \}/.exec(example)[0];
  const map = /map \$http_upgrade[\s\S]*?\n    \}/.exec(example)[0];
  return `worker_processes 1;
error_log ${dir}/error.log warn;
pid ${dir}/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path ${dir}/tmp; proxy_temp_path ${dir}/tmp;
    fastcgi_temp_path ${dir}/tmp; uwsgi_temp_path ${dir}/tmp; scgi_temp_path ${dir}/tmp;
    ${map}
    upstream comet { server ${comet.browser}; keepalive 16; }
    server {
        listen 127.0.0.1:${nginxPort};
        ${push}
        location / { proxy_pass http://127.0.0.1:${pagePort}; }
    }
}
`;
}

let nginxDir, pagePort;
async function startNginx() {
  const child = spawn(NGINX, ['-p', nginxDir, '-c', path.join(nginxDir, 'nginx.conf'), '-g', 'daemon off;'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d) => { err += d; });
  await until(() => new Promise((r) => {
    const s = net.connect(nginxPort, '127.0.0.1', () => { s.destroy(); r(true); });
    s.on('error', () => r(false));
  }), 5000, `nginx up (${err})`);
  return child;
}
async function stopNginx() {
  const done = new Promise((r) => nginx.once('exit', r));
  nginx.kill('SIGTERM');
  await done;
}

function page(subscriber, channel) {
  const opts = { reconnectTimeout: 300 };
  if (subscriber) opts.subscriber = subscriber;
  return `<!doctype html><meta charset="utf-8"><title>NchanSubscriber ${subscriber || 'default'}</title>
<script src="/NchanSubscriber.js"></script>
<pre id="log"></pre>
<script>
  window.got = [];
  var sub = new NchanSubscriber(location.origin + '/push/sub/${channel}', ${JSON.stringify(opts)});
  sub.on('message', function (msg, meta) {
    got.push({ msg: msg, id: meta.id });
    document.getElementById('log').textContent += msg + '\\n';
  });
  sub.start();
</script>`;
}

before(async () => {
  pages = await nchanPages(page);
  pagePort = pages.address().port;
  nginxPort = await freePort();
  origin = `http://127.0.0.1:${nginxPort}`;
  comet = await startComet(`[log]
level = "info"
[browser]
listen = "127.0.0.1:0"
poll_timeout_secs = 5
stream_ping_secs = 5
[control]
listen = "127.0.0.1:0"
[control.tokens]
php = "${TOKEN}"
[admin]
listen = "127.0.0.1:0"
`);
  nginxDir = mkdtempSync(path.join(os.tmpdir(), 'comet-nchan-nginx-'));
  mkdirSync(path.join(nginxDir, 'tmp'));
  writeFileSync(path.join(nginxDir, 'nginx.conf'), nginxConf(nginxDir, pagePort));
  nginx = await startNginx();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  if (nginx && nginx.exitCode === null) await stopNginx();
  await comet?.stop();
  pages?.close();
});

const info = async () => {
  const text = String(await resp(comet.control, TOKEN, 'INFO'));
  return Object.fromEntries(text.split('\r\n').filter((l) => l.includes(':')).map((l) => l.split(':')));
};
const publish = (ch, msg) => resp(comet.control, TOKEN, 'PUBLISH', ch, msg);
const field = { websocket: 'websocket_streams', eventsource: 'eventsource_streams' };

for (const [name, subscriber, transport] of [['websocket', 'websocket', 'websocket'], ['eventsource', 'eventsource', 'eventsource'], ['defaults', '', 'websocket']]) {
  test(`NchanSubscriber (${name}) behind nginx: a burst in order, a private channel, resume after nginx restarts`, async () => {
    const ch = `goods-${name}`;
    const ctx = await browser.newContext();
    const p = await ctx.newPage();
    p.on('pageerror', (e) => console.error('page error:', e));
    await p.goto(`${origin}/?subscriber=${subscriber}&channel=${ch}`);
    await until(async () => Number((await info())[field[transport]]) >= 1, 5000, `a ${transport} stream open`);
    const want = [];
    for (let i = 0; i < 50; i++) {
      want.push(`m${i}`);
      await publish(ch, `m${i}`);
    }
    await p.waitForFunction((n) => window.got.length >= n, 50, { timeout: 10000 });
    assert.deepEqual((await p.evaluate(() => window.got)).map((g) => g.msg), want);

    // nginx goes away and comes back: messages published meanwhile arrive after the reconnect.
    await stopNginx();
    for (let i = 50; i < 60; i++) {
      want.push(`m${i}`);
      await publish(ch, `m${i}`);
    }
    nginx = await startNginx();
    await p.waitForFunction((n) => window.got.length >= n, 60, { timeout: 15000 });
    await publish(ch, 'after');
    want.push('after');
    await p.waitForFunction((n) => window.got.length >= n, 61, { timeout: 10000 });
    await sleep(300);
    const got = await p.evaluate(() => window.got);
    assert.deepEqual(got.map((g) => g.msg), want, 'no loss, no duplicates, in order');
    for (const g of got) assert.match(g.id, /^\d+:\d+$/);
    await shot(p, `nchan-${name}`);

    // A private channel: the session cookie, opened by the backend.
    const sid = `nchan${name}`;
    await ctx.addCookies([{ name: 'PHPSESSID', value: sid, domain: '127.0.0.1', path: '/' }]);
    await resp(comet.control, TOKEN, 'SESSION.OPEN', sid);
    const q = await ctx.newPage();
    await q.goto(`${origin}/?subscriber=${subscriber}&channel=@me`);
    await until(async () => Number((await info())[field[transport]]) >= 2, 5000, 'the private stream open');
    await publish(`session:${sid}`, 'for you only');
    await q.waitForFunction(() => window.got.length >= 1, null, { timeout: 5000 });
    assert.equal((await q.evaluate(() => window.got))[0].msg, 'for you only');
    await ctx.close();
    await until(async () => Number((await info())[field[transport]]) === 0, 5000, 'the streams closed with the pages');
  });
}
