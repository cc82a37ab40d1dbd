// The Mercure hub (v0.24 dialect) in a real browser: the upstream dunglas/mercure v0.24.2
// conformance suite's cases, ported to headless chromium. Each case opens an EventSource on
// /.well-known/mercure from a page served by the hub itself (`/`), publishes with fetch() once it
// is open, and checks the publish answer and what arrives (or does not).
// Run: node --test tests/browser/mercure.test.mjs (after cargo build --release).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { launch, startComet } from './lib.mjs';

const KEY = '!ChangeThisMercureHubJWTSecretKey!';
// {"mercure":{"publish":["*"],"subscribe":["*"]}}, HS256 with KEY (the upstream suite's token).
const JWT = 'eyJhbGciOiJIUzI1NiJ9.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdLCJzdWJzY3JpYmUiOlsiKiJdfX0.' +
  'bVXdlWXwfw9ySx7-iV5OpUSHo34RkjUdVzDLBcc6l_g';
const DATA = 'first line\n\n  indented line\nlast';

let comet, browser, origin;

const config = () => `[log]
level = "info"
[browser]
listen = "127.0.0.1:0"
[control]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[mercure]
publisher_jwt_key = "${KEY}"
subscriber_jwt_key = "${KEY}"
anonymous = true
cors_origins = ["*"]
publish_origins = ["*"]
subscriptions = true
`;

before(async () => {
  comet = await startComet(config());
  origin = `http://${comet.browser}`;
  browser = await launch();
});

after(async () => {
  if (browser) await browser.close();
  if (comet) await comet.stop();
});

const suffix = () => randomBytes(6).toString('hex');

async function newPage() {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error('page error:', e));
  const r = await page.goto(origin + '/');
  assert.equal(r.status(), 200);
  return page;
}

/**
 * In the page: subscribes to `selectors`, and once open publishes each of `updates`
 * ({topics, id, data, private}) in turn; collects events for `wait` ms after the last publish
 * (or until `expect` events arrived). Resolves to {posts: [{status, ctype, body}], events}.
 */
async function run({ selectors, updates, wait, expect }) {
  const page = await newPage();
  try {
    return await page.evaluate(async ({ origin, jwt, selectors, updates, wait, expect }) => {
      const url = origin + '/.well-known/mercure?' + selectors.map((s) => 'topic=' + encodeURIComponent(s)).join('&');
      const es = new EventSource(url);
      const events = [];
      let gotAll;
      const all = new Promise((r) => { gotAll = r; });
      es.onmessage = (e) => {
        events.push({ id: e.lastEventId, data: e.data, type: e.type });
        if (expect && events.length >= expect) gotAll();
      };
      await new Promise((resolve, reject) => {
        es.onopen = resolve;
        setTimeout(() => reject(new Error('EventSource not open within 5 s')), 5000);
      });
      const posts = [];
      for (const u of updates) {
        const body = new URLSearchParams([
          ...u.topics.map((t) => ['topic', t]),
          ['id', u.id],
          ['data', u.data],
          ...(u.private ? [['private', 'on']] : []),
        ]);
        const r = await fetch(origin + '/.well-known/mercure', {
          method: 'POST', headers: { Authorization: 'Bearer ' + jwt }, body,
        });
        posts.push({ status: r.status, ctype: r.headers.get('content-type') || '', body: await r.text() });
      }
      await Promise.race([all, new Promise((r) => setTimeout(r, wait))]);
      es.close();
      return { posts, events };
    }, { origin, jwt: JWT, selectors, updates, wait, expect });
  } finally {
    await page.context().close();
  }
}

function checkPost(post, id) {
  assert.equal(post.status, 200);
  assert.match(post.ctype, /^text\/plain/);
  assert.equal(post.body, id);
}

/** One update to `publish` topics, subscribed with `selectors`: delivered within 2 s. */
async function delivered(selectors, publish) {
  const id = 'id-' + JSON.stringify(publish);
  const { posts, events } = await run({ selectors, updates: [{ topics: publish, id, data: DATA }], wait: 2000, expect: 1 });
  checkPost(posts[0], id);
  assert.equal(events.length, 1, 'one event within 2 s');
  assert.equal(events[0].id, id);
  assert.equal(events[0].data, DATA);
}

/** One update to `publish` topics, subscribed with `selectors`: nothing within 1 s. */
async function notDelivered(selectors, publish, priv = false) {
  const id = 'id-' + JSON.stringify(publish);
  const { posts, events } = await run({ selectors, updates: [{ topics: publish, id, data: DATA, private: priv }], wait: 1000 });
  checkPost(posts[0], id);
  assert.deepEqual(events, [], 'no event within 1 s');
}

test('1: a raw string topic', async () => {
  const t = 'raw-' + suffix();
  await delivered([t], [t]);
});

test('2: several update topics', async () => {
  const s = suffix();
  await delivered([`b-${s}`], [`a-${s}`, `b-${s}`]);
});

test('3: several selectors', async () => {
  const s = suffix();
  await delivered([`a-${s}`, `b-${s}`], [`b-${s}`]);
});

test('4: a URI topic', async () => {
  const t = `https://example.com/books/1-${suffix()}`;
  await delivered([t], [t]);
});

test('5: a URI template selector', async () => {
  const s = suffix();
  await delivered([`https://example.net/foo-${s}/{random}`], [`https://example.net/foo-${s}/bar`]);
});

test('6: a non-matching string is not delivered', async () => {
  const s = suffix();
  await notDelivered([`wanted-${s}`], [`other-${s}`]);
});

test('7: a non-matching URI is not delivered', async () => {
  const s = suffix();
  await notDelivered([`https://example.com/books/1-${s}`], [`https://example.com/books/2-${s}`]);
});

test('8: a non-matching URI template is not delivered', async () => {
  const s = suffix();
  await notDelivered([`https://example.net/foo-${s}/{random}`], [`https://example.net/bar-${s}/baz`]);
});

test('9: a private update is not delivered to an anonymous subscriber', async () => {
  const t = 'private-' + suffix();
  await notDelivered([t], [t], true);
});

test('10: the page at / is HTML', async () => {
  const r = await fetch(origin + '/');
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type') || '', /^text\/html/);
  assert.match(await r.text(), /<html|<!doctype html/i);
});

test('11: two updates arrive in publish order with their ids', async () => {
  const t = 'order-' + suffix();
  const updates = [
    { topics: [t], id: `id-1-${t}`, data: DATA + ' 1' },
    { topics: [t], id: `id-2-${t}`, data: DATA + ' 2' },
  ];
  const { posts, events } = await run({ selectors: [t], updates, wait: 2000, expect: 2 });
  posts.forEach((p, i) => checkPost(p, updates[i].id));
  assert.deepEqual(events.map((e) => [e.id, e.data]), updates.map((u) => [u.id, u.data]));
});
