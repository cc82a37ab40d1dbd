// The admin page in a real browser: served by the admin listener, fed by the daemon's own push
// (a long-poll on /live), showing who is online, the channels and the publish rate. Run:
// node tests/browser/admin.test.mjs (after cargo build --release).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { launch, shot, startComet, resp, until, splitAddr } from './lib.mjs';

const TOKEN = 's3cret-token';
let comet, browser;
const polls = [];

before(async () => {
  comet = await startComet(`[log]
level = "info"
[browser]
listen = "127.0.0.1:0"
poll_timeout_secs = 20
[control]
listen = "127.0.0.1:0"
[control.tokens]
php = "${TOKEN}"
[admin]
listen = "127.0.0.1:0"
[presence]
grace_secs = 1
`);
  browser = await launch();
});

after(async () => {
  for (const p of polls) p.destroy();
  await browser?.close();
  await comet?.stop();
});

// A visitor's poll, held open by the daemon, from node (not the browser under test).
function visitor(sid, channel) {
  const [host, port] = splitAddr(comet.browser);
  const req = http.get({ host, port, path: `/sub/${channel}`, headers: { Cookie: `PHPSESSID=${sid}` } });
  req.on('error', () => {});
  polls.push(req);
}

test('the admin page shows visitors, channels and the publish rate, pushed live', async () => {
  await resp(comet.control, TOKEN, 'SESSION.OPEN', 'alice-sid', 'alice');
  visitor('alice-sid', 'goods');
  visitor('bob-sid', 'news');
  await until(async () => (await resp(comet.control, TOKEN, 'ONLINE', 'COUNT')) === 2, 5000, 'two visitors online');

  const page = await browser.newPage();
  await page.goto(`http://${comet.admin}/#token=${TOKEN}`);
  await page.waitForFunction(() => document.getElementById('online_count').textContent === '2', null, { timeout: 5000 });
  const rows = await page.$$eval('#visitors tbody tr', (trs) => trs.map((tr) => tr.textContent));
  assert.deepEqual(rows.sort(), ['alice-sidalice', 'bob-sid']);
  const channels = await page.$$eval('#channels tbody tr', (trs) => trs.map((tr) => tr.textContent));
  assert.deepEqual(channels.sort(), ['goods1', 'news1']);

  // Publishing shows in the rate and totals within a couple of pushes; nothing asks but the
  // page's one long-poll.
  const requests = [];
  page.on('request', (r) => requests.push(new URL(r.url()).pathname));
  for (let i = 0; i < 5; i++) await resp(comet.control, TOKEN, 'PUBLISH', 'goods', `bid ${i}`);
  await page.waitForFunction(() => Number(document.getElementById('published').textContent) >= 5, null, { timeout: 5000 });
  assert.ok(requests.every((p) => p === '/live'), `only /live is requested: ${requests}`);
  const updates = Number(await page.evaluate(() => document.body.dataset.updates));
  assert.ok(updates >= 2, `several pushes arrived (${updates})`);
  await shot(page, 'admin-page');

  // A wrong token: the page asks for one instead of showing data.
  const other = await browser.newPage();
  await other.goto(`http://${comet.admin}/#token=wrong`);
  await other.waitForFunction(() => document.getElementById('state').textContent === 'token needed', null, { timeout: 5000 });
  await shot(other, 'admin-page-token-needed');
});
