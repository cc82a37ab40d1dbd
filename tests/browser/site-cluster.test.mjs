// The talk's site (docs/examples/site) on a comet cluster: the who's-online list with two browser
// sessions on different nodes. One redis-server, three comet nodes (the config scripts/demo
// writes, plus [cluster] and [presence] database), the PHP site under php -S and its presence
// worker, and one nginx with two `server` blocks: the same PHP site on both, but /push/ on the
// first goes to node n1 and on the second to node n2. alice's browser uses the first, bob's the
// second (separate contexts: separate cookie jars), so every subscriber of alice's page (comet.js:
// a WebSocket by default) is on n1 and every one of bob's on n2. PHP's control connection (SESSION.OPEN, JOIN, PRESENCE goods) is on n3,
// the presence worker (SUBSCRIBE __presence__, PRESENCE, PUBLISH presence:goods) on n1.
// Each page must list both users; ONLINE / PRESENCE on every node, and the shared presence
// table, must list both sessions; bob's page closes and he leaves alice's list after the grace;
// alice logs out. __presence__ events must come once per cluster.
// Run: node tests/browser/site-cluster.test.mjs (after cargo build --release and npm ci; needs
// redis-server, nginx, php-cli, php-redis, php-sqlite3). COMET_LOG=1 shows the nodes' logs.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync, mkdtempSync, mkdirSync, existsSync, rmSync, chmodSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { launch, shot, startComet, resp, until, sleep, ROOT, freePorts, addr, canConnect, within } from './lib.mjs';

const NGINX = process.env.NGINX || '/usr/sbin/nginx';
const REDIS = process.env.REDIS_SERVER || 'redis-server';
const PHP = process.env.PHP || 'php';
const GRACE_SECS = 2;
const GRACE = GRACE_SECS * 1000;
const SITE = path.join(ROOT, 'docs/examples/site');
const TOKEN = randomBytes(18).toString('hex');

const DIR = mkdtempSync(path.join(os.tmpdir(), 'comet-site-cluster-'));
const DATA = path.join(DIR, 'data');
const SITE_DB = path.join(DATA, 'site.sqlite');
let redis, redisPort, phpPort, nginx, worker, php, browser;
let siteA, siteB; // the two nginx servers: /push/ to n1, /push/ to n2
let failed = false;
const nodes = [];
const pages = {};
const sids = {};

/** Every child process started here, stopped by pid (php -S by its process group: it forks). */
const children = new Set();
const reap = () => {
  for (const c of children) {
    if (c.exitCode !== null || c.signalCode !== null) continue;
    try {
      if (c.group) process.kill(-c.pid, 'SIGKILL'); else c.kill('SIGKILL');
    } catch { /* gone */ }
  }
};
process.on('exit', reap);
process.on('uncaughtException', reap);
for (const [sig, n] of [['SIGINT', 2], ['SIGTERM', 15], ['SIGHUP', 1]]) {
  process.on(sig, () => { reap(); process.exit(128 + n); });
}
process.stdout.on('error', () => {});


/** A child whose stdout and stderr go to DIR/<name>.log. */
function run(name, cmd, args, opts = {}) {
  const out = path.join(DIR, `${name}.log`);
  writeFileSync(out, '');
  const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  const append = (d) => writeFileSync(out, d, { flag: 'a' });
  c.stdout.on('data', append);
  c.stderr.on('data', append);
  c.group = Boolean(opts.detached);
  c.logFile = out;
  children.add(c);
  return c;
}
const tail = (f, n) => (existsSync(f) ? readFileSync(f, 'utf8').trim().split('\n').slice(-n).join('\n') : '(none)');

/** The comet config scripts/demo writes, plus the cluster and the shared presence table. */
function nodeToml(n) {
  return `[log]
level = "info"
[browser]
listen = "${addr(n.browser)}"
session_cookie = "PHPSESSID"
poll_timeout_secs = 30
[control]
listen = "${addr(n.control)}"
[control.tokens]
php = "${TOKEN}"
[admin]
listen = "${addr(n.admin)}"
[presence]
grace_secs = ${GRACE_SECS}
database = "${SITE_DB}"
[cluster]
redis = "${addr(redisPort)}"
node = "${n.name}"
`;
}

async function startNode(n) {
  const c = await startComet(nodeToml(n), { dir: n.dir });
  children.add(c.child);
  n.comet = c;
  const linked = `cluster: node ${n.name} linked to Redis`;
  await until(() => c.logs.some((l) => l.includes(linked)) || c.child.exitCode !== null,
    10000, `${n.name} linked to Redis`);
  if (c.child.exitCode !== null) throw new Error(`${n.name} exited (${c.child.exitCode}):\n${c.logs.join('\n')}`);
}

/** The /push/ location of docs/examples/site/nginx.conf, to `upstream`. */
const pushLocation = (upstream) => `
        location /push/ {
            proxy_pass http://${upstream}/;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 75s;
            proxy_send_timeout 75s;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP $remote_addr;
        }`;
const phpLocation = `
        location / {
            proxy_pass http://php;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP $remote_addr;
        }`;

function nginxConf() {
  return `worker_processes 1;
error_log ${DIR}/nginx-error.log warn;
pid ${DIR}/nginx.pid;
events { worker_connections 1024; }
http {
    log_format up '$msec $server_port $request_method $request_uri $status upstream=$upstream_addr sid=$cookie_PHPSESSID';
    access_log ${DIR}/nginx-access.log up;
    client_body_temp_path ${DIR}/tmp; proxy_temp_path ${DIR}/tmp;
    fastcgi_temp_path ${DIR}/tmp; uwsgi_temp_path ${DIR}/tmp; scgi_temp_path ${DIR}/tmp;
    types { text/html html; text/css css; application/javascript js; }
    map $http_upgrade $connection_upgrade {
        default upgrade;
        ''      '';
    }
    upstream comet_n1 { server ${addr(nodes[0].browser)}; keepalive 16; }
    upstream comet_n2 { server ${addr(nodes[1].browser)}; keepalive 16; }
    upstream php { server ${addr(phpPort)}; }
    # alice's browser: the site, with /push/ on n1.
    server {
        listen ${addr(siteA)};${pushLocation('comet_n1')}${phpLocation}
    }
    # bob's browser: the same site, with /push/ on n2.
    server {
        listen ${addr(siteB)};${pushLocation('comet_n2')}${phpLocation}
    }
}
`;
}

/** A RESP command on node `n` (authenticated), retried on -TRYAGAIN for up to 5 s. */
async function cmd(n, ...args) {
  const end = Date.now() + 5000;
  for (;;) {
    try {
      return await resp(addr(n.control), TOKEN, ...args);
    } catch (e) {
      if (!/^TRYAGAIN/.test(e.message) || Date.now() > end) throw new Error(`${args.join(' ')} on ${n.name}: ${e.message}`);
      await sleep(100);
    }
  }
}
/** Flat [sid, user, ...] -> {sid: user}. */
const pairs = (flat) => {
  const out = {};
  for (let i = 0; i + 1 < flat.length; i += 2) out[flat[i]] = flat[i + 1];
  return out;
};
async function info(n) {
  const text = String(await cmd(n, 'INFO'));
  return Object.fromEntries(text.split('\r\n').filter((l) => l.includes(':')).map((l) => {
    const i = l.indexOf(':');
    return [l.slice(0, i), l.slice(i + 1)];
  }));
}

/** Rows of the shared presence table (through PHP's PDO: php-sqlite3 is here anyway). */
function presenceRows() {
  const code = `$p = new PDO('sqlite:' . $argv[1], null, null, [PDO::ATTR_TIMEOUT => 5]);
    $t = $p->query("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'comet_online'")->fetchColumn();
    echo json_encode($t ? $p->query('SELECT session, user, channel, daemon FROM comet_online ORDER BY session, channel, daemon')->fetchAll(PDO::FETCH_ASSOC) : []);`;
  return JSON.parse(execFileSync(PHP, ['-r', code, SITE_DB], { encoding: 'utf8', timeout: 10000 }));
}
/** SELECT DISTINCT session, user FROM comet_online WHERE channel = '' as {sid: user}. */
const whoIsOnline = () => Object.fromEntries(presenceRows().filter((r) => r.channel === '').map((r) => [r.session, r.user]));

/** The presence worker's log: one event per line ("online <sid> <user>", "join <sid> goods", ...). */
const workerEvents = () => readFileSync(worker.logFile, 'utf8').split('\n').filter((l) => /^(online|offline|join|leave) /.test(l));

/** nginx's access log: every /push/ request with the server port, the node and the session. */
function pushRequests() {
  const f = path.join(DIR, 'nginx-access.log');
  if (!existsSync(f)) return [];
  const byPort = Object.fromEntries(nodes.map((n) => [addr(n.browser), n.name]));
  return readFileSync(f, 'utf8').split('\n').filter((l) => l.includes(' /push/')).map((l) => {
    const [, port, method, uri, status, up, sid] = /^\S+ (\d+) (\S+) (\S+) (\d+) upstream=(\S*) sid=(\S*)$/.exec(l) || [];
    return { port: Number(port), method, uri, status, node: up && (byPort[up] || up), sid, line: l };
  });
}

function report(extra = '') {
  const parts = [extra];
  for (const n of nodes) parts.push(`--- ${n.name} log (last 30 lines)\n${(n.comet ? n.comet.logs : []).slice(-30).join('\n')}`);
  if (worker) parts.push(`--- presence worker (last 30 lines)\n${tail(worker.logFile, 30)}`);
  if (php) parts.push(`--- php -S (last 20 lines)\n${tail(php.logFile, 20)}`);
  parts.push(`--- nginx /push/ requests\n${pushRequests().map((r) => r.line).join('\n')}`);
  parts.push(`--- nginx error log (last 20 lines)\n${tail(path.join(DIR, 'nginx-error.log'), 20)}`);
  return parts.join('\n');
}
/** Runs `fn`; on failure marks the run failed and adds the logs to the error. */
async function checked(fn) {
  try {
    return await fn();
  } catch (e) {
    failed = true;
    e.message += `\n${report()}`;
    throw e;
  }
}

before(async () => {
  failed = true;
  for (const [what, bin] of [['nginx', NGINX]]) if (!existsSync(bin)) throw new Error(`${what} missing: ${bin}`);
  const [rp, pp, a, b, ...rest] = await freePorts(4 + 3 * 3);
  [redisPort, phpPort, siteA, siteB] = [rp, pp, a, b];
  for (let i = 0; i < 3; i++) {
    const [br, c, ad] = rest.slice(3 * i, 3 * i + 3);
    const dir = path.join(DIR, `n${i + 1}`);
    mkdirSync(dir);
    nodes.push({ name: `n${i + 1}`, browser: br, control: c, admin: ad, dir, comet: null });
  }
  for (const d of ['data', 'sessions', 'tmp']) mkdirSync(path.join(DIR, d));
  chmodSync(DIR, 0o711); // nginx started as root runs its worker as nobody

  redis = run('redis', REDIS, ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { cwd: DIR });
  await until(async () => {
    if (redis.exitCode !== null) throw new Error(`redis-server exited: ${tail(redis.logFile, 20)}`);
    return (await resp(addr(redisPort), null, 'PING')) === 'PONG';
  }, 5000, 'redis-server up');

  await Promise.all(nodes.map(startNode));
  const [n1, , n3] = nodes;

  // The PHP site talks to n3; its presence worker to n1.
  const phpEnv = (n) => ({ ...process.env, COMET_HOST: '127.0.0.1', COMET_PORT: String(n.control), COMET_TOKEN: TOKEN, COMET_SITE_DATA: DATA });
  php = run('php', PHP, ['-d', `session.save_path=${path.join(DIR, 'sessions')}`, '-d', 'display_errors=stderr',
    '-S', addr(phpPort), '-t', SITE], { env: { ...phpEnv(n3), PHP_CLI_SERVER_WORKERS: '4' }, detached: true });
  worker = run('worker', PHP, [path.join(ROOT, 'docs/examples/php/presence-worker.php'), '--publish=goods',
    `--state=${path.join(DATA, 'online.json')}`], { env: phpEnv(n1) });
  // The worker is on: n1 has its two connections (events and commands).
  await until(async () => {
    if (worker.exitCode !== null) throw new Error(`presence worker exited: ${tail(worker.logFile, 20)}`);
    return Number((await info(n1)).connected_backends) >= 2;
  }, 5000, 'the presence worker connected to n1');

  writeFileSync(path.join(DIR, 'nginx.conf'), nginxConf());
  nginx = run('nginx', NGINX, ['-p', `${DIR}/`, '-e', path.join(DIR, 'nginx-error.log'), '-c', path.join(DIR, 'nginx.conf'),
    '-g', 'daemon off;']);
  await until(async () => {
    if (nginx.exitCode !== null) throw new Error(`nginx exited: ${tail(nginx.logFile, 20)}`);
    for (const port of [siteA, siteB]) {
      const r = await fetch(`http://${addr(port)}/`);
      if (r.status !== 200) return false;
      const js = await fetch(`http://${addr(port)}/push/comet.js`);
      if (js.status !== 200) return false;
    }
    return true;
  }, 10000, 'the site and comet through nginx on both ports');
  await sleep(300); // the worker subscribes right after its first PRESENCE

  browser = await launch();
  failed = false;
});

after(async () => {
  await browser?.close().catch(() => {});
  const stops = [];
  const term = (c) => {
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    stops.push(new Promise((r) => c.once('exit', r)));
    try {
      if (c.group) process.kill(-c.pid, 'SIGTERM'); else c.kill('SIGTERM');
    } catch { /* gone */ }
  };
  term(nginx);
  term(worker);
  term(php);
  for (const n of nodes) if (n.comet) stops.push(n.comet.stop());
  await within(Promise.all(stops), 5000);
  if (redis && redis.exitCode === null) {
    const done = new Promise((r) => redis.once('exit', r));
    redis.kill('SIGTERM');
    await within(done, 3000);
  }
  reap();
  if (failed) console.error(`site-cluster.test: logs and configs kept in ${DIR}`);
  else rmSync(DIR, { recursive: true, force: true });
});

async function login(name, port) {
  const url = `http://${addr(port)}/`;
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error(`${name}: page error:`, e));
  await page.goto(url);
  await page.fill('#user', name);
  await Promise.all([page.waitForURL(url), page.click('#login')]);
  await page.waitForSelector('#me');
  assert.equal(await page.textContent('#me'), name);
  const cookie = (await ctx.cookies(url)).find((c) => c.name === 'PHPSESSID');
  assert.ok(cookie, `${name} has a PHPSESSID cookie`);
  pages[name] = page;
  sids[name] = cookie.value;
  return page;
}
const onlineUsers = (page) => page.$$eval('#online li', (lis) => lis.map((l) => l.dataset.user));
const listIs = (page, want, ms) => page.waitForFunction((w) => [...document.querySelectorAll('#online li')]
  .map((l) => l.dataset.user).join() === w, want.join(), { timeout: ms });

test('alice (pushed from n1) and bob (pushed from n2) log in; each page lists both', { timeout: 20000 }, () => checked(async () => {
  const alice = await login('alice', siteA);
  const bob = await login('bob', siteB);
  assert.notEqual(sids.alice, sids.bob);
  await shot(alice, 'site-cluster-01-alice-logged-in');
  for (const [name, p] of Object.entries(pages)) {
    await listIs(p, ['alice', 'bob'], 8000).catch(async (e) => {
      await shot(p, `site-cluster-FAILED-${name}-list`);
      throw new Error(`${name}'s list is ${JSON.stringify(await onlineUsers(p))}, not alice,bob: ${e.message}`);
    });
    await p.waitForFunction(() => document.getElementById('status').dataset.state === 'live', null, { timeout: 5000 });
  }
  await shot(alice, 'site-cluster-02-alice-sees-both');
  await shot(bob, 'site-cluster-02-bob-sees-both');
  // Where the subscribers are right now (comet.js's default transport is a WebSocket, then
  // EventSource, then long-poll): alice's two (goods, @me) on n1, bob's two on n2, none on n3.
  let held;
  await until(async () => {
    held = await Promise.all(nodes.map(async (n) => {
      const i = await info(n);
      return Number(i.websocket_streams) + Number(i.eventsource_streams) + Number(i.held_polls);
    }));
    return held.join() === '2,2,0';
  }, 5000, "each page's two subscribers on its node").catch((e) => {
    throw new Error(`${e.message}; subscribers (streams + held polls) on n1,n2,n3: ${held}`);
  });
}));

test('ONLINE, ONLINE COUNT and PRESENCE goods on every node list both sessions', { timeout: 10000 }, () => checked(async () => {
  const want = { [sids.alice]: 'alice', [sids.bob]: 'bob' };
  for (const n of nodes) {
    assert.deepEqual(pairs(await cmd(n, 'ONLINE')), want, `ONLINE on ${n.name}`);
    assert.equal(await cmd(n, 'ONLINE', 'COUNT'), 2, `ONLINE COUNT on ${n.name}`);
    assert.deepEqual(pairs(await cmd(n, 'PRESENCE', 'goods')), want, `PRESENCE goods on ${n.name}`);
    const i = await info(n);
    assert.equal(i.cluster_link, 'up', `${n.name} linked`);
    assert.equal(i.cluster_nodes_alive, '3', `${n.name} sees three nodes`);
  }
  // Each node counts only its own browsers; the cluster counts both.
  const local = await Promise.all(nodes.map(async (n) => Number((await info(n)).online_sessions)));
  assert.deepEqual(local, [1, 1, 0], 'online_sessions per node (n1, n2, n3)');
}));

test('the shared presence table: both sessions, each written by its node', { timeout: 10000 }, () => checked(async () => {
  await until(() => Object.keys(whoIsOnline()).length === 2, 5000, 'two online rows');
  assert.deepEqual(whoIsOnline(), { [sids.alice]: 'alice', [sids.bob]: 'bob' });
  const rows = presenceRows();
  const daemons = (sid, ch) => rows.filter((r) => r.session === sid && r.channel === ch).map((r) => r.daemon);
  assert.deepEqual(daemons(sids.alice, ''), ['n1'], "alice's online row from n1");
  assert.deepEqual(daemons(sids.bob, ''), ['n2'], "bob's online row from n2");
  assert.deepEqual(daemons(sids.alice, 'goods'), ['n1'], "alice's goods row from n1");
  assert.deepEqual(daemons(sids.bob, 'goods'), ['n2'], "bob's goods row from n2");
}));

test('a bid from bob (PHP on n3) reaches alice on n1 and bob on n2', { timeout: 10000 }, () => checked(async () => {
  const { alice, bob } = pages;
  const bid = Number(await alice.textContent('#price')) + 25;
  await bob.fill('#amount', String(bid));
  await bob.click('#bid');
  const seen = (p) => p.waitForFunction((b) => document.getElementById('price').textContent === String(b)
    && document.getElementById('bidder').textContent === 'bob', bid, { timeout: 3000 });
  await Promise.all([seen(alice), seen(bob)]);
  await shot(alice, 'site-cluster-03-alice-after-bid');
}));

test("bob's page (on n2) closes: he leaves alice's list (on n1) after the grace, everywhere", { timeout: 20000 }, (t) => checked(async () => {
  const { alice, bob } = pages;
  const t0 = Date.now();
  await bob.context().close();
  await listIs(alice, ['alice'], GRACE + 5000).catch(async (e) => {
    await shot(alice, 'site-cluster-FAILED-bob-still-listed');
    throw new Error(`alice's list is ${JSON.stringify(await onlineUsers(alice))} ${Date.now() - t0} ms after bob left: ${e.message}`);
  });
  const took = Date.now() - t0;
  assert.ok(took >= GRACE - 1000, `bob left after ${took} ms, before the ${GRACE} ms grace`);
  assert.ok(took <= GRACE + 3000, `bob left after ${took} ms, long after the ${GRACE} ms grace`);
  await shot(alice, 'site-cluster-04-bob-gone');
  t.diagnostic(`bob left alice's list ${took} ms after his page closed (grace ${GRACE} ms)`);
  const want = { [sids.alice]: 'alice' };
  for (const n of nodes) {
    assert.deepEqual(pairs(await cmd(n, 'ONLINE')), want, `ONLINE on ${n.name} after bob left`);
    assert.deepEqual(pairs(await cmd(n, 'PRESENCE', 'goods')), want, `PRESENCE goods on ${n.name} after bob left`);
  }
  await until(() => JSON.stringify(whoIsOnline()) === JSON.stringify(want), 5000, "bob's rows gone from the presence table");
}));

test('alice logs out: her private stream ends (410); she goes offline', { timeout: 15000 }, () => checked(async () => {
  const { alice } = pages;
  await alice.click('#logout');
  await alice.waitForFunction(() => document.getElementById('status').dataset.state === 'ended', null, { timeout: 3000 });
  assert.match(await alice.textContent('#status'), /410/);
  await shot(alice, 'site-cluster-05-alice-logged-out');
  await until(async () => (await cmd(nodes[2], 'ONLINE', 'COUNT')) === 0, GRACE + 5000, 'ONLINE COUNT 0 on n3');
  for (const n of nodes) assert.deepEqual(await cmd(n, 'ONLINE'), [], `ONLINE on ${n.name} empty`);
  await until(() => workerEvents().some((l) => l === `offline ${sids.alice}`), 3000, "alice's offline event");
  await until(() => presenceRows().length === 0, 5000, 'the presence table empty');
  await alice.context().close();
}));

test('__presence__ (the worker, on n1): each event once for the cluster; every /push/ request on its node', { timeout: 10000 }, (t) => checked(async () => {
  await sleep(500); // a late duplicate, if any, would be in by now
  const events = workerEvents();
  const count = (e) => events.filter((l) => l === e).length;
  for (const [name, sid] of Object.entries(sids)) {
    const mine = events.filter((l) => l.split(' ')[1] === sid);
    const detail = `${name}'s events: ${JSON.stringify(mine)}`;
    assert.equal(count(`online ${sid} ${name}`), 1, `one "online" for ${name}; ${detail}`);
    assert.equal(count(`join ${sid} goods`), 1, `one "join goods" for ${name}; ${detail}`);
    assert.equal(count(`leave ${sid} goods`), 1, `one "leave goods" for ${name}; ${detail}`);
    assert.equal(count(`offline ${sid}`), 1, `one "offline" for ${name}; ${detail}`);
    assert.ok(mine.indexOf(`online ${sid} ${name}`) < mine.indexOf(`join ${sid} goods`), `online before join; ${detail}`);
    assert.ok(mine.indexOf(`leave ${sid} goods`) < mine.indexOf(`offline ${sid}`), `leave before offline; ${detail}`);
  }
  // nginx: every /push/ request on alice's port went to n1, on bob's to n2; each carried its own
  // session cookie only (same host 127.0.0.1, but separate cookie jars).
  t.diagnostic(`__presence__ events: ${events.join(' | ')}`);
  const reqs = pushRequests();
  const on = (port) => reqs.filter((r) => r.port === port);
  for (const [port, node, name] of [[siteA, 'n1', 'alice'], [siteB, 'n2', 'bob']]) {
    const polls = on(port).filter((r) => r.uri.startsWith('/push/sub/'));
    assert.ok(polls.some((r) => r.uri.startsWith('/push/sub/goods')), `${name}'s goods polls through nginx`);
    assert.ok(polls.some((r) => r.uri.startsWith('/push/sub/@me')), `${name}'s @me polls through nginx`);
    assert.deepEqual([...new Set(on(port).map((r) => r.node))], [node], `${name}'s /push/ requests all on ${node}`);
    assert.deepEqual([...new Set(polls.map((r) => r.sid))], [sids[name]], `${name}'s polls carry ${name}'s session only`);
    t.diagnostic(`${name} (port ${port}): ${polls.map((r) => `${r.uri} ${r.status} via ${r.node}`).join(', ')}`);
  }
}));
