// Helpers for the browser tests: headless Debian chromium through playwright-core, the real
// comet daemon started from a config file, a tiny RESP client, and waits with deadlines.

import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, mkdirSync, readFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const SHOTS = process.env.SCREENSHOT_DIR || path.join(ROOT, 'target/browser-screenshots');
export const COMET_BIN = process.env.COMET_BIN || path.join(ROOT, 'target/release/comet');

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Headless chromium with a fresh profile; every test context is a separate cookie jar. */
export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-dev-shm-usage'],
  });
}

/** A screenshot of `page` as target/browser-screenshots/<name>.png. */
export async function shot(page, name) {
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

/** Polls `fn` (async, returns truthy when done) every 50 ms until `ms` elapse; throws `what`. */
export async function until(fn, ms, what) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last})`);
    await sleep(50);
  }
}

/** A running comet daemon started from `toml`; `ports` from its `ready` line. */
export async function startComet(toml, { dir } = {}) {
  dir = dir || mkdtempSync(path.join(os.tmpdir(), 'comet-browser-'));
  const conf = path.join(dir, 'server.toml');
  writeFileSync(conf, toml);
  const child = spawn(COMET_BIN, ['--config', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  const logs = [];
  const ready = new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`comet not ready in 10 s:\n${logs.join('\n')}`)), 10000);
    child.stderr.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        logs.push(line);
        if (process.env.COMET_LOG) process.stderr.write(`comet: ${line}\n`);
        const m = / ready browser=(\S+) control=(\S+) admin=(\S+)/.exec(line);
        if (m) {
          clearTimeout(timer);
          resolve({ browser: m[1], control: m[2], admin: m[3] });
        }
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`comet exited (${code}) before ready:\n${logs.join('\n')}`));
    });
  });
  const addrs = await ready;
  return {
    child, dir, logs, ...addrs,
    /** SIGTERM, then waits for the exit (the daemon answers held polls 503 first). */
    async stop() {
      if (child.exitCode !== null) return child.exitCode;
      const done = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      return done;
    },
  };
}

/** One RESP command on a fresh connection (AUTH first when `token`); resolves to the reply. */
export function resp(addr, token, ...args) {
  const [host, port] = splitAddr(addr);
  const cmds = token ? [['AUTH', token], args] : [args];
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, host);
    let buf = Buffer.alloc(0);
    const replies = [];
    sock.setTimeout(5000, () => { sock.destroy(); reject(new Error(`RESP ${args[0]}: timeout`)); });
    sock.on('error', reject);
    sock.on('connect', () => {
      for (const c of cmds) {
        let s = `*${c.length}\r\n`;
        for (const a of c) s += `$${Buffer.byteLength(String(a))}\r\n${a}\r\n`;
        sock.write(s);
      }
    });
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const r = parseReply(buf, 0);
        if (!r) break;
        replies.push(r.value);
        buf = buf.subarray(r.end);
      }
      if (replies.length === cmds.length) {
        sock.end();
        const last = replies[replies.length - 1];
        if (last instanceof Error) reject(last); else resolve(last);
      }
    });
  });
}

function parseReply(b, i) {
  const eol = b.indexOf('\r\n', i);
  if (eol < 0) return null;
  const line = b.toString('utf8', i + 1, eol);
  const t = String.fromCharCode(b[i]);
  if (t === '+') return { value: line, end: eol + 2 };
  if (t === '-') return { value: new Error(line), end: eol + 2 };
  if (t === ':') return { value: Number(line), end: eol + 2 };
  if (t === '$') {
    const n = Number(line);
    if (n < 0) return { value: null, end: eol + 2 };
    if (b.length < eol + 2 + n + 2) return null;
    return { value: b.toString('utf8', eol + 2, eol + 2 + n), end: eol + 4 + n };
  }
  if (t === '*') {
    const n = Number(line);
    const out = [];
    let at = eol + 2;
    for (let k = 0; k < n; k++) {
      const r = parseReply(b, at);
      if (!r) return null;
      out.push(r.value);
      at = r.end;
    }
    return { value: out, end: at };
  }
  throw new Error(`bad RESP reply byte ${t}`);
}

export function splitAddr(addr) {
  const i = addr.lastIndexOf(':');
  return [addr.slice(0, i), Number(addr.slice(i + 1))];
}

/** GET `url` with node's fetch: {status, headers, text}. */
export async function get(url, headers = {}) {
  const r = await fetch(url, { headers });
  return { status: r.status, headers: r.headers, text: await r.text() };
}

/** `n` distinct free loopback ports (all held open at once, then released). */
export async function freePorts(n) {
  const servers = await Promise.all([...Array(n)].map(() => new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => resolve(s));
  })));
  const ports = servers.map((s) => s.address().port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

/** A loopback address. */
export const addr = (port) => `127.0.0.1:${port}`;

/** Whether something accepts on a loopback port. */
export const canConnect = (port) => new Promise((r) => {
  const s = net.connect(port, '127.0.0.1', () => { s.destroy(); r(true); });
  s.on('error', () => r(false));
});

/** `promise`, or nothing after `ms` (the timer unref'd, so it does not keep the process up). */
export const within = (promise, ms) => Promise.race([promise, new Promise((r) => setTimeout(r, ms).unref())]);

/**
 * A loopback HTTP server of test pages for nchan's NchanSubscriber: `/NchanSubscriber.js` from
 * the npm package, any other path `page(subscriber, channel)` from its query string. Resolves
 * once it listens; its port is `server.address().port`.
 */
export async function nchanPages(page) {
  const js = readFileSync(path.join(ROOT, 'tests/browser/node_modules/nchan/NchanSubscriber.js'));
  const server = http.createServer((req, res) => {
    if (req.url === '/NchanSubscriber.js') {
      res.writeHead(200, { 'Content-Type': 'application/javascript' });
      return res.end(js);
    }
    const u = new URL(req.url, 'http://x');
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' });
    res.end(page(u.searchParams.get('subscriber') || '', u.searchParams.get('channel')));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return server;
}
