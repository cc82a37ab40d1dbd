// The talk's site (docs/examples/site) in two real browser sessions, through nginx, against the
// real comet: started by scripts/test-browser with scripts/demo. Run alone with the demo up:
//   SITE_URL=http://127.0.0.1:8080/ GRACE_SECS=3 node tests/browser/site.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { launch, shot, get, until, sleep } from './lib.mjs';

const URL = process.env.SITE_URL || 'http://127.0.0.1:8080/';
const GRACE = Number(process.env.GRACE_SECS || 3) * 1000;

let browser;
const pages = {};

before(async () => {
  browser = await launch();
});

after(async () => {
  if (browser) await browser.close();
});

async function login(name) {
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error(`${name}: page error:`, e));
  await page.goto(URL);
  await page.fill('#user', name);
  await Promise.all([page.waitForURL(URL), page.click('#login')]);
  await page.waitForSelector('#me');
  assert.equal(await page.textContent('#me'), name);
  pages[name] = page;
  return page;
}

const onlineUsers = (page) => page.$$eval('#online li', (lis) => lis.map((l) => l.dataset.user));

test('GET /push/comet.js through nginx, with caching headers', async () => {
  const r = await get(new globalThis.URL('push/comet.js', URL).href);
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type'), /javascript/);
  assert.match(r.headers.get('cache-control'), /max-age=\d+/);
  assert.ok(r.text.includes('Comet'), 'the client script');
});

test('alice and bob log in; each sees both online', async () => {
  const alice = await login('alice');
  const bob = await login('bob');
  await shot(alice, 'site-01-alice-logged-in');
  for (const p of [alice, bob]) {
    await p.waitForFunction(() => {
      const users = [...document.querySelectorAll('#online li')].map((l) => l.dataset.user);
      return users.includes('alice') && users.includes('bob');
    }, null, { timeout: 5000 });
    await p.waitForFunction(() => document.getElementById('status').dataset.state === 'live', null, { timeout: 5000 });
  }
  assert.deepEqual(await onlineUsers(alice), ['alice', 'bob']);
  await shot(alice, 'site-02-alice-sees-both');
  await shot(bob, 'site-02-bob-sees-both');
});

test('a bid from bob reaches both pages within a second', async () => {
  const { alice, bob } = pages;
  const price = Number(await alice.textContent('#price'));
  const bid = price + 25;
  await bob.fill('#amount', String(bid));
  const t0 = Date.now();
  await bob.click('#bid');
  const seen = (p) => p.waitForFunction((b) => document.getElementById('price').textContent === String(b)
    && document.getElementById('bidder').textContent === 'bob', bid, { timeout: 3000 });
  await Promise.all([seen(alice), seen(bob)]);
  const took = Date.now() - t0;
  assert.ok(took < 1000, `the bid took ${took} ms to reach both pages`);
  assert.ok((await alice.textContent('#bids')).includes(`${bid} € by bob`));
  // A bid that is not higher is refused, and changes nothing.
  await alice.fill('#amount', String(bid));
  await alice.click('#bid');
  await alice.waitForFunction(() => document.getElementById('bid-result').textContent.includes('already'), null, { timeout: 3000 });
  assert.equal(await bob.textContent('#price'), String(bid));
  await shot(alice, 'site-03-alice-after-bid');
  await shot(bob, 'site-03-bob-after-bid');
});

test('a private message from alice reaches bob only', async () => {
  const { alice, bob } = pages;
  const text = `psst, bob ${Date.now()}`;
  await alice.fill('#to', 'bob');
  await alice.fill('#text', text);
  const t0 = Date.now();
  await alice.click('#send');
  await bob.waitForFunction((t) => document.getElementById('inbox').textContent.includes(t), text, { timeout: 3000 });
  assert.ok(Date.now() - t0 < 1000, 'the message arrived within a second');
  assert.equal(await bob.textContent('#inbox li[data-from="alice"]'), `alice: ${text}`);
  await alice.waitForFunction(() => document.getElementById('send-result').textContent === 'sent to bob', null, { timeout: 3000 });
  await alice.waitForTimeout(300);
  assert.ok(!(await alice.textContent('#inbox')).includes(text), "alice's page does not show it");
  await shot(bob, 'site-04-bob-got-message');
  await shot(alice, 'site-04-alice-sent-message');
});

test('comet restarts: both pages come back by themselves, private stream included', { skip: !process.env.DEMO_DIR && 'DEMO_DIR unset' }, async () => {
  const { alice, bob } = pages;
  const demoPid = Number(readFileSync(path.join(process.env.DEMO_DIR, 'demo.pid'), 'utf8'));
  const comet = path.join(process.env.DEMO_DIR, 'comet.log');
  const readyLines = () => readFileSync(comet, 'utf8').split('\n').filter((l) => l.includes(' ready browser=')).length;
  const before = readyLines();
  // Message ids restart with the daemon: let a second pass so that no id from before the restart
  // equals one from after (see the report on same-second restarts).
  await sleep(1100);
  process.kill(demoPid, 'SIGHUP'); // scripts/demo restarts comet: held polls get 503, then refused
  await until(() => readyLines() > before, 10000, 'comet to be ready again');
  // comet forgot the open sessions: each page's @me poll gets 403, asks PHP (reopen.php), goes on.
  // A bid and a private message after the restart reach their pages.
  const price = Number(await alice.textContent('#price'));
  const text = `after the restart ${Date.now()}`;
  // The bid is buffered on goods: each page gets it as soon as its poll is back.
  await bob.fill('#amount', String(price + 5));
  await bob.click('#bid');
  await bob.waitForFunction(() => document.getElementById('bid-result').textContent === '', null, { timeout: 3000 });
  for (const p of [alice, bob]) {
    await p.waitForFunction((want) => Number(document.getElementById('price').textContent) === want, price + 5, { timeout: 15000 });
  }
  await until(async () => {
    await bob.fill('#to', 'alice');
    await bob.fill('#text', text);
    await bob.click('#send');
    await sleep(700);
    return (await alice.textContent('#inbox')).includes(text);
  }, 15000, "bob's message to reach alice after the restart");
  for (const p of [alice, bob]) assert.notEqual(await p.getAttribute('#status', 'data-state'), 'ended');
  for (const p of [alice, bob]) {
    await p.waitForFunction(() => [...document.querySelectorAll('#online li')].map((l) => l.dataset.user).join() === 'alice,bob',
      null, { timeout: 10000 }).catch(async (e) => { await shot(p, 'site-05-FAILED-online-after-restart'); throw e; });
  }
  await shot(alice, 'site-05-alice-after-restart');
});

test("bob's page closes: he leaves alice's online list after the grace period", async () => {
  const { alice, bob } = pages;
  const t0 = Date.now();
  await bob.context().close();
  await alice.waitForFunction(() => ![...document.querySelectorAll('#online li')].some((l) => l.dataset.user === 'bob'),
    null, { timeout: GRACE + 5000 });
  const took = Date.now() - t0;
  assert.ok(took >= GRACE - 1000, `bob left after ${took} ms, before the ${GRACE} ms grace`);
  assert.ok(took <= GRACE + 3000, `bob left after ${took} ms, long after the ${GRACE} ms grace`);
  assert.deepEqual(await onlineUsers(alice), ['alice']);
  await shot(alice, 'site-06-bob-gone');
});

test("alice logs out: her private stream ends (410) and the page says so", async () => {
  const { alice } = pages;
  await alice.click('#logout');
  await alice.waitForFunction(() => document.getElementById('status').dataset.state === 'ended', null, { timeout: 3000 });
  assert.match(await alice.textContent('#status'), /410/);
  assert.ok(await alice.isDisabled('#bid'), 'the forms are off');
  await shot(alice, 'site-07-alice-logged-out');
  await alice.click('#relogin');
  await alice.waitForSelector('#login-form');
});
