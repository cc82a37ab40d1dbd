// Cluster mode in a real browser: the `nchan` npm package's NchanSubscriber in Chromium, behind
// an nginx whose `upstream comet` is three comet nodes (round robin) linked through one
// redis-server. 60 numbered messages are published at a steady pace from alternating nodes;
// after the 20th the node the browser is on is killed (SIGKILL) and started again on the same
// ports. The page must get exactly the 60, in order, no loss, no duplicates. Run on the
// subscriber's defaults (websocket, what a site moving from nchan meets first), on long-poll
// (every poll round-robins across the nodes, each resuming from the cursor) and on EventSource.
// Run: node tests/browser/cluster.test.mjs (after cargo build --release and npm ci; needs
// redis-server and nginx). Set COMET_LOG=1 to see the nodes' logs as they run.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync, mkdtempSync, mkdirSync, existsSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { launch, shot, startComet, resp, until, sleep, ROOT, freePorts, addr, canConnect, within, nchanPages } from './lib.mjs';

const NGINX = process.env.NGINX || '/usr/sbin/nginx';
const REDIS = process.env.REDIS_SERVER || 'redis-server';
const TOTAL = 60;
const KILL_AFTER = 20;
const PACE_MS = 50;

const DIR = mkdtempSync(path.join(os.tmpdir(), 'comet-cluster-browser-'));
let redis, redisPort, nginx, nginxPort, pages, browser;
let failed = false;
/** The three nodes: name, fixed ports, config dir, and the running daemon (null while dead). */
const nodes = [];
/**
 * Every child process started here, so that they are stopped (by pid) however this script ends:
 * normally (after()), on an uncaught error, on SIGTERM from `timeout`, or on Ctrl-C.
 */
const children = new Set();
const reap = () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
};
process.on('exit', reap);
process.on('uncaughtException', reap); // registered before the test runner's own, so it runs first
for (const [sig, n] of [['SIGINT', 2], ['SIGTERM', 15], ['SIGHUP', 1]]) {
  process.on(sig, () => { reap(); process.exit(128 + n); });
}
// stdout closed early (`| head`): not a reason to stop half way and leave the children behind.
process.stdout.on('error', () => {});


function nodeToml(n) {
  return `[log]
level = "info"
[browser]
listen = "${addr(n.browser)}"
first_message = "oldest"
poll_timeout_secs = 5
stream_ping_secs = 5
[control]
listen = "${addr(n.control)}"
[admin]
listen = "${addr(n.admin)}"
[cluster]
redis = "${addr(redisPort)}"
node = "${n.name}"
`;
}

/** Starts (or starts again, same dir, config and ports) node `n`; resolves once linked to Redis. */
async function startNode(n) {
  n.history.push(`--- ${n.name} run ${n.runs + 1}`);
  const c = await startComet(nodeToml(n), { dir: n.dir });
  children.add(c.child);
  n.comet = c;
  n.runs += 1;
  assert.equal(c.browser, addr(n.browser), `${n.name} on its fixed browser port`);
  const linked = `cluster: node ${n.name} linked to Redis`;
  await until(() => c.logs.some((l) => l.includes(linked)) || c.child.exitCode !== null,
    10000, `${n.name} linked to Redis`);
  if (c.child.exitCode !== null) throw new Error(`${n.name} exited (${c.child.exitCode}):\n${c.logs.join('\n')}`);
  n.ready = true;
}

/** SIGKILL, no shutdown of any kind; resolves once the process is gone. */
async function killNode(n) {
  const c = n.comet;
  n.ready = false;
  n.comet = null;
  if (c.child.exitCode === null && c.child.signalCode === null) {
    const done = new Promise((r) => c.child.once('exit', r));
    c.child.kill('SIGKILL');
    await done;
  }
  n.history.push(...c.logs, `--- ${n.name} killed (SIGKILL)`);
}
const logsOf = (n) => [...n.history, ...(n.comet ? n.comet.logs : [])];

function nginxConf(pagePort) {
  const servers = nodes.map((n) => `server ${addr(n.browser)} max_fails=0;`).join('\n        ');
  return `worker_processes 1;
error_log ${DIR}/nginx-error.log warn;
pid ${DIR}/nginx.pid;
events { worker_connections 1024; }
http {
    log_format up '$msec $request $status upstream=$upstream_addr ($upstream_status)';
    access_log ${DIR}/nginx-access.log up;
    client_body_temp_path ${DIR}/tmp; proxy_temp_path ${DIR}/tmp;
    fastcgi_temp_path ${DIR}/tmp; uwsgi_temp_path ${DIR}/tmp; scgi_temp_path ${DIR}/tmp;
    map $http_upgrade $connection_upgrade {
        default upgrade;
        ''      '';
    }
    upstream comet {
        ${servers}
        # max_fails=0: a dead node is not taken out of the rotation for a while; each request
        # tries it in its turn and goes on to the next one (proxy_next_upstream), so the
        # restarted node gets its share of the subscribers as soon as it is back.
        keepalive 16;
    }
    server {
        listen ${addr(nginxPort)};
        location /sub/ {
            proxy_pass http://comet;
            # A dead node is skipped: the request goes to the next one.
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 75s;
            proxy_send_timeout 75s;
            proxy_set_header Host $http_host;
        }
        location / { proxy_pass http://127.0.0.1:${pagePort}; }
    }
}
`;
}

function page(subscriber, channel) {
  const opts = { reconnectTimeout: 300 };
  if (subscriber) opts.subscriber = subscriber;
  return `<!doctype html><meta charset="utf-8"><title>NchanSubscriber ${subscriber || 'default'} on a cluster</title>
<script src="/NchanSubscriber.js"></script>
<pre id="log"></pre>
<script>
  window.got = [];
  window.errors = [];
  var sub = new NchanSubscriber(location.origin + '/sub/${channel}', ${JSON.stringify(opts)});
  sub.on('message', function (msg, meta) {
    got.push({ msg: msg, id: meta.id });
    document.getElementById('log').textContent += msg + '\\n';
  });
  sub.on('error', function (code, text) { errors.push(String(code) + ' ' + String(text)); });
  sub.start();
</script>`;
}

/** A node's INFO as an object (no token: the control listener is loopback-only and open). */
async function info(n) {
  const text = String(await resp(addr(n.control), null, 'INFO'));
  return Object.fromEntries(text.split('\r\n').filter((l) => l.includes(':')).map((l) => {
    const i = l.indexOf(':');
    return [l.slice(0, i), l.slice(i + 1)];
  }));
}
const field = { websocket: 'websocket_streams', eventsource: 'eventsource_streams', longpoll: 'held_polls' };
/** How many subscribers of `transport` each live node holds: [{node, count}]. */
async function holders(transport) {
  const out = [];
  for (const n of nodes) {
    if (!n.ready) continue;
    try {
      out.push({ node: n, count: Number((await info(n))[field[transport]]) || 0 });
    } catch { /* a node going away */ }
  }
  return out;
}

/**
 * PUBLISH on node `n`; a -TRYAGAIN (Redis not reachable from that node) is retried after 100 ms.
 * Returns the reply (subscriber count).
 */
async function publishOn(n, ch, msg) {
  const end = Date.now() + 5000;
  for (;;) {
    try {
      return await resp(addr(n.control), null, 'PUBLISH', ch, msg);
    } catch (e) {
      if (!/^TRYAGAIN/.test(e.message) || Date.now() > end) throw new Error(`PUBLISH ${msg} on ${n.name}: ${e.message}`);
      await sleep(100);
    }
  }
}

before(async () => {
  failed = true; // until everything is up: a failed start keeps its logs too
  if (!existsSync(NGINX)) throw new Error(`${NGINX} missing`);
  const [rp, np, ...rest] = await freePorts(2 + 3 * 3);
  redisPort = rp;
  nginxPort = np;
  for (let i = 0; i < 3; i++) {
    const [b, c, a] = rest.slice(3 * i, 3 * i + 3);
    const dir = path.join(DIR, `n${i + 1}`);
    mkdirSync(dir);
    nodes.push({ name: `n${i + 1}`, browser: b, control: c, admin: a, dir, comet: null, ready: false, runs: 0, history: [] });
  }

  redis = spawn(REDIS, ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
    { stdio: ['ignore', 'pipe', 'pipe'], cwd: DIR });
  children.add(redis);
  let redisOut = '';
  redis.stdout.on('data', (d) => { redisOut += d; });
  redis.stderr.on('data', (d) => { redisOut += d; });
  await until(async () => {
    if (redis.exitCode !== null) throw new Error(`redis-server exited: ${redisOut}`);
    return (await resp(addr(redisPort), null, 'PING')) === 'PONG';
  }, 5000, `redis-server up (${redisOut})`);

  await Promise.all(nodes.map(startNode));

  pages = await nchanPages(page);

  mkdirSync(path.join(DIR, 'tmp'));
  writeFileSync(path.join(DIR, 'nginx.conf'), nginxConf(pages.address().port));
  nginx = spawn(NGINX, ['-p', DIR, '-e', path.join(DIR, 'nginx-error.log'), '-c', path.join(DIR, 'nginx.conf'), '-g', 'daemon off;'],
    { stdio: ['ignore', 'ignore', 'pipe'] });
  children.add(nginx);
  let err = '';
  nginx.stderr.on('data', (d) => { err += d; });
  await until(async () => {
    if (nginx.exitCode !== null) throw new Error(`nginx exited: ${err}`);
    return canConnect(nginxPort);
  }, 5000, `nginx up (${err})`);

  browser = await launch();
  failed = false;
});

after(async () => {
  await browser?.close().catch(() => {});
  const stops = [];
  if (nginx && nginx.exitCode === null) {
    stops.push(new Promise((r) => nginx.once('exit', r)));
    nginx.kill('SIGTERM');
  }
  for (const n of nodes) if (n.comet) stops.push(n.comet.stop());
  await within(Promise.all(stops), 5000);
  if (redis && redis.exitCode === null) {
    const done = new Promise((r) => redis.once('exit', r));
    redis.kill('SIGTERM');
    await within(done, 3000);
  }
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  pages?.closeAllConnections(); // nginx's keepalive connections would hold the loop 5 s
  pages?.close();
  if (failed) console.error(`cluster.test: logs and configs kept in ${DIR}`);
  else rmSync(DIR, { recursive: true, force: true });
});

/** nginx's access log for `ch`: which node served each subscriber request, and how it ended. */
function subscriberRequests(ch) {
  const f = path.join(DIR, 'nginx-access.log');
  if (!existsSync(f)) return [];
  const byPort = Object.fromEntries(nodes.map((n) => [addr(n.browser), n.name]));
  return readFileSync(f, 'utf8').split('\n').filter((l) => l.includes(`/sub/${ch}`)).map((l) => {
    const m = / (\d{3}) upstream=(.*) \((.*)\)$/.exec(l);
    return m ? `${m[1]} via ${m[2].replace(/127\.0\.0\.1:\d+/g, (a) => byPort[a] || a)} (${m[3]})` : l;
  });
}

/** What to look at when a run fails: the nodes' logs, nginx's view of the upstreams. */
function report(ch, extra) {
  const tail = (f, n) => (existsSync(f) ? readFileSync(f, 'utf8').trim().split('\n').slice(-n).join('\n') : '(none)');
  const parts = [extra];
  for (const n of nodes) parts.push(`--- ${n.name} log (last 40 lines)\n${logsOf(n).slice(-40).join('\n')}`);
  parts.push(`--- requests on /sub/${ch} through nginx\n${subscriberRequests(ch).join('\n')}`);
  parts.push(`--- nginx access log (last 80 lines)\n${tail(path.join(DIR, 'nginx-access.log'), 80)}`);
  parts.push(`--- nginx error log (last 20 lines)\n${tail(path.join(DIR, 'nginx-error.log'), 20)}`);
  return parts.join('\n');
}

for (const [name, subscriber, transport] of [['defaults', '', 'websocket'], ['longpoll', 'longpoll', 'longpoll'], ['eventsource', 'eventsource', 'eventsource']]) {
  test(`NchanSubscriber (${name}) behind nginx on three nodes: every message in order while a node is killed and restarted`, { timeout: 15000 }, async (t) => {
    const ch = `cluster-${name}`;
    const ctx = await browser.newContext();
    const p = await ctx.newPage();
    const pageErrors = [];
    p.on('pageerror', (e) => pageErrors.push(String(e)));
    const events = [];
    const t0 = Date.now();
    const note = (s) => events.push(`${String(Date.now() - t0).padStart(5)} ms  ${s}`);
    try {
      await p.goto(`http://${addr(nginxPort)}/?subscriber=${subscriber}&channel=${ch}`);
      await until(async () => (await holders(transport)).some((h) => h.count >= 1), 5000, `a ${transport} subscriber on some node`);
      note(`subscribed (${transport})`);

      const want = [];
      let victim = null;
      for (let i = 0; i < TOTAL; i++) {
        if (i === KILL_AFTER) {
          // The node the browser is on now (its stream, or the poll it holds); else n1.
          const on = (await holders(transport)).filter((h) => h.count >= 1).map((h) => h.node);
          victim = on[0] || nodes[0];
          note(`SIGKILL ${victim.name} (subscriber on: ${on.map((n) => n.name).join(',') || 'none seen'})`);
          await killNode(victim);
          // Restarted a moment later, on the same ports and config; publishing goes on meanwhile.
          const v = victim;
          setTimeout(() => {
            startNode(v).then(() => note(`${v.name} restarted and linked`), (e) => note(`${v.name} restart failed: ${e.message}`));
          }, 300);
        }
        const live = nodes.filter((n) => n.ready);
        const on = live[i % live.length];
        const msg = `m${String(i).padStart(2, '0')}`;
        want.push(msg);
        await publishOn(on, ch, msg);
        await sleep(PACE_MS);
      }
      note(`published ${TOTAL}`);
      await until(() => victim.ready, 10000, `${victim.name} back`);

      await p.waitForFunction((n) => window.got.length >= n, TOTAL, { timeout: 8000 }).catch(() => {});
      await sleep(500); // late duplicates, if any, would arrive now
      const got = await p.evaluate(() => window.got);
      const errors = await p.evaluate(() => window.errors);
      note(`page has ${got.length} messages; subscriber errors: ${JSON.stringify(errors)}`);
      await shot(p, `cluster-${name}`);

      const msgs = got.map((g) => g.msg);
      const seen = new Map();
      const dups = msgs.filter((m) => seen.set(m, (seen.get(m) || 0) + 1).get(m) === 2);
      const lost = want.filter((m) => !seen.has(m));
      const detail = `lost: ${JSON.stringify(lost)}, duplicated: ${JSON.stringify(dups)}\n`
        + `got (msg@id): ${got.map((g) => `${g.msg}@${g.id}`).join(' ')}`;
      assert.deepEqual(msgs, want, `exactly the ${TOTAL} messages, in order, no loss, no duplicates\n${detail}`);
      // Cluster-wide ids: "time:tag", strictly increasing.
      for (const g of got) assert.match(g.id, /^\d+:\d+$/);
      const key = (id) => id.split(':').map(Number);
      for (let k = 1; k < got.length; k++) {
        const [a, b] = [key(got[k - 1].id), key(got[k].id)];
        assert.ok(b[0] > a[0] || (b[0] === a[0] && b[1] > a[1]), `ids increase: ${got[k - 1].id} then ${got[k].id}`);
      }
      assert.deepEqual(pageErrors, [], 'no page errors');
    } catch (e) {
      failed = true;
      e.message += `\n${report(ch, events.join('\n'))}`;
      throw e;
    } finally {
      await ctx.close();
    }
    // What happened, for the record: the kill, and which node served each subscriber request
    // (nginx logs a WebSocket or EventSource request when it ends: after the page is closed).
    await sleep(200);
    for (const e of events) t.diagnostic(e);
    t.diagnostic(`requests on /sub/${ch}: ${subscriberRequests(ch).join(' | ')}`);
  });
}
