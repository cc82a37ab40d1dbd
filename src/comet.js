/*! comet.js: the browser client of the comet push daemon (WebSocket, EventSource, long-poll). MIT.
 *
 *   var sub = Comet.subscribe('/push', 'goods', {
 *     onMessage: function (data, meta) { ... },   // meta.channel, meta.id ("time:tag"), ...
 *     onError:   function (status, sub) { ... },  // 0 / 5xx / ...: it retries by itself
 *     onClose:   function (status, sub) { ... },  // 403 / 410 / ...: it has stopped
 *     persist:   true,                            // resume after a reload (sessionStorage)
 *     transport: ['websocket', 'eventsource', 'longpoll']  // the default: tried in this order
 *   });
 *   sub.stop();
 *
 * Dependency-free; see docs/client.md for every option. */
(function (root, factory) {
  var Comet = factory(root);
  if (typeof module === 'object' && module.exports) module.exports = Comet;
  else root.Comet = Comet;
})(typeof self !== 'undefined' ? self : this, function (root) {
  'use strict';

  // Statuses after which polling again cannot help: the page must act (log in again, ...).
  var FINAL = { 400: 1, 401: 1, 403: 1, 404: 1, 405: 1, 410: 1 };
  var TRANSPORTS = ['websocket', 'eventsource', 'longpoll'];
  // A stream that has not opened by then is taken as unable to connect: a proxy that does not
  // pass the upgrade on (the daemon then holds it as a poll), or buffers the event stream.
  var OPEN_TIMEOUT = 10000;
  var unloading = false;
  if (root && root.addEventListener) {
    // Navigating away aborts the poll (status 0): that is not an error worth showing.
    root.addEventListener('pagehide', function () { unloading = true; });
    root.addEventListener('pageshow', function () { unloading = false; });
  }

  function noop() {}

  // Channel ids use A-Z a-z 0-9 _ - . : ~ , and "@me": all safe in a path, keep them readable.
  function encodeChannel(ch) {
    return encodeURIComponent(ch).replace(/%40/g, '@').replace(/%3A/gi, ':').replace(/%2C/gi, ',');
  }

  // "Sun, 06 Nov 1994 08:49:37 GMT" + "3" -> {time, tag}; null when there is no cursor.
  function cursorFrom(lastModified, etag) {
    if (!lastModified) return null;
    var ms = Date.parse(lastModified);
    if (isNaN(ms)) return null;
    var tag = parseInt(String(etag || '0').replace(/^W\//, '').replace(/"/g, ''), 10);
    return { time: Math.floor(ms / 1000), tag: isNaN(tag) ? 0 : tag };
  }

  function cursorString(c) { return c ? c.time + ':' + c.tag : null; }

  function parseCursor(s) {
    var m = /^(\d+):(\d+)$/.exec(String(s || ''));
    return m ? { time: +m[1], tag: +m[2] } : null;
  }

  // "Name: value" lines -> {name (lowercase): value}.
  function parseHeaders(text) {
    var h = {}, lines = text.split(/\r?\n/);
    for (var i = 0; i < lines.length; i++) {
      var c = lines[i].indexOf(':');
      if (c > 0) h[lines[i].slice(0, c).trim().toLowerCase()] = lines[i].slice(c + 1).trim();
    }
    return h;
  }

  // A multipart/mixed body -> [{headers, body}], as nchan and comet send batches:
  // "--B\r\n" headers "\r\n\r\n" body "\r\n--B\r\n" ... "\r\n--B--". The CRLF before a
  // delimiter belongs to the delimiter (RFC 2046), so a body is never trimmed further. Split on
  // the delimiter rather than counting Content-Length: responseText counts UTF-16 units, not bytes.
  function parseMultipart(text, boundary) {
    var delim = '--' + boundary, parts = [];
    var pos = text.indexOf(delim);
    while (pos !== -1) {
      pos += delim.length;
      if (text.substr(pos, 2) === '--') break; // the close delimiter
      var eol = text.indexOf('\n', pos); // the rest of the delimiter line (transport padding)
      if (eol === -1) break;
      pos = eol + 1;
      var next = text.indexOf('\n' + delim, pos);
      var end = next === -1 ? text.length : next;
      if (next !== -1 && text.charAt(next - 1) === '\r') end = next - 1;
      var part = text.slice(pos, end), head = '', body;
      if (/^\r?\n/.test(part)) {
        body = part.replace(/^\r?\n/, ''); // no headers at all
      } else {
        var m = /\r?\n\r?\n/.exec(part);
        head = m ? part.slice(0, m.index) : part;
        body = m ? part.slice(m.index + m[0].length) : '';
      }
      parts.push({ headers: parseHeaders(head), body: body });
      if (next === -1) break;
      pos = next + 1;
    }
    return parts;
  }

  function boundaryOf(contentType) {
    var m = /^\s*multipart\/mixed\s*;.*?boundary=(?:"([^"]+)"|([^;\s]+))/i.exec(contentType || '');
    return m ? (m[1] || m[2]) : null;
  }

  // The transports to try, in order: the option's, minus unknown names, those this browser
  // lacks, and EventSource on @me. An event stream carries no channel name, and on @me the
  // copies of JOINed channels must say where they were published (meta.channel): there it goes
  // from WebSocket straight to long-poll. Long-poll (XMLHttpRequest) is the last resort.
  function transportsFor(option, channel) {
    var asked = option == null ? TRANSPORTS : [].concat(option), out = [], w = root || {};
    for (var i = 0; i < asked.length; i++) {
      var t = asked[i];
      if (TRANSPORTS.indexOf(t) === -1 || out.indexOf(t) !== -1) continue;
      if (t === 'websocket' && typeof w.WebSocket !== 'function') continue;
      if (t === 'eventsource' && (typeof w.EventSource !== 'function' || channel === '@me')) continue;
      out.push(t);
    }
    return out.length ? out : ['longpoll'];
  }

  // http(s) -> ws(s); a relative base ("/push", "") is resolved against the page.
  function wsUrl(url) {
    if (!/^https?:/i.test(url) && root && root.location) {
      if (typeof root.URL === 'function') url = new root.URL(url, root.location.href).href;
      else if (/^\/\//.test(url)) url = root.location.protocol + url;
      else url = root.location.protocol + '//' + root.location.host + url;
    }
    return url.replace(/^http/i, 'ws');
  }

  function utf8(bytes) {
    if (root && typeof root.TextDecoder === 'function') return new root.TextDecoder('utf-8').decode(bytes);
    var s = '';
    for (var i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
    try { return decodeURIComponent(escape(s)); } catch (e) { return s; }
  }

  // A ws+meta.comet frame -> {id, type, channel, body (string), bytes (binary frames only)}:
  // "id: <time>:<tag>\ncontent-type: <ct>\nchannel: <channel>\n\n<body>".
  function parseFrame(payload) {
    var head, body, bytes = null;
    if (typeof payload === 'string') {
      var i = payload.indexOf('\n\n');
      head = i === -1 ? payload : payload.slice(0, i);
      body = i === -1 ? '' : payload.slice(i + 2);
    } else {
      var b = new Uint8Array(payload), j = 0;
      while (j + 1 < b.length && !(b[j] === 10 && b[j + 1] === 10)) j++;
      var end = j + 1 < b.length ? j : b.length;
      head = utf8(b.subarray(0, end));
      bytes = payload.slice(Math.min(end + 2, b.length));
      body = utf8(new Uint8Array(bytes));
    }
    var h = parseHeaders(head);
    return { id: parseCursor(h.id), type: h['content-type'] || '', channel: h.channel || null, body: body, bytes: bytes };
  }

  function storage() {
    try { return root.sessionStorage || null; } catch (e) { return null; }
  }

  /** One subscription to one channel, over the first transport that connects. */
  function Subscription(base, channel, opts) {
    opts = opts || {};
    this.channel = channel;
    this.url = String(base || '').replace(/\/+$/, '') + '/sub/' + encodeChannel(channel);
    this.opts = opts;
    this.onMessage = opts.onMessage || noop;
    this.onError = opts.onError || noop;
    this.onClose = opts.onClose || noop;
    this.running = false;
    this.attempt = 0; // errors in a row, for the backoff
    // persist: true, or a string naming what the id belongs to (e.g. one login), so that a
    // new login in the same tab does not resume after the previous session's last id.
    this.storeKey = opts.persist ? 'comet:' + (typeof opts.persist === 'string' ? opts.persist + ':' : '') + this.url : null;
    this.cursor = parseCursor(opts.since) || this.load();
    this.transports = transportsFor(opts.transport, channel);
    this.index = 0; // into transports: the one in use
    this.transport = this.transports[0];
    this.worked = false; // the transport in use has opened once: it stays
    // The next try is one long poll: a stream that cannot open does not show why (a WebSocket
    // or EventSource refused with 403 only says "error"), a poll's status does.
    this.probe = false;
    this.xhr = null;
    this.stream = null; // the open (or opening) WebSocket or EventSource
    this.timer = null;
    var self = this;
    this.wake = function () { if (self.timer && self.running) { self.clearTimer(); self.connect(); } };
    this.start();
  }

  Subscription.prototype.load = function () {
    var s = this.storeKey && storage();
    try { return s ? parseCursor(s.getItem(this.storeKey)) : null; } catch (e) { return null; }
  };

  Subscription.prototype.save = function () {
    var s = this.storeKey && storage();
    try { if (s && this.cursor) s.setItem(this.storeKey, cursorString(this.cursor)); } catch (e) { /* full or off */ }
  };

  /** The last message id seen, "time:tag", or null. */
  Subscription.prototype.lastId = function () { return cursorString(this.cursor); };

  Subscription.prototype.start = function () {
    if (this.running) return this;
    this.running = true;
    if (root && root.addEventListener) root.addEventListener('online', this.wake);
    this.connect();
    return this;
  };

  /** Stops polling; no callback is called after this. */
  Subscription.prototype.stop = function () {
    this.running = false;
    this.clearTimer();
    clearTimeout(this.guard);
    if (root && root.removeEventListener) root.removeEventListener('online', this.wake);
    if (this.xhr) {
      var x = this.xhr;
      this.xhr = null;
      try { x.abort(); } catch (e) { /* already done */ }
    }
    if (this.stream) {
      var s = this.stream;
      this.stream = null;
      try { s.close(); } catch (e) { /* already closed */ }
    }
    return this;
  };

  // Opens the transport in use (or the probe poll).
  Subscription.prototype.connect = function () {
    if (!this.running) return;
    this.transport = this.transports[this.index];
    if (this.probe || this.transport === 'longpoll') this.poll();
    else if (this.transport === 'websocket') this.openWebSocket();
    else this.openEventSource();
  };

  // The poll after a 200 or 408: the next one, or back to the stream once the probe answered.
  Subscription.prototype.again = function () {
    if (this.probe) { this.probe = false; this.connect(); } else this.poll();
  };

  // A stream's URL: the cursor goes in the query, as neither transport can set headers.
  Subscription.prototype.streamUrl = function () {
    var o = this.opts, q = [];
    if (o.query) q.push(String(o.query).replace(/^[?&]/, ''));
    if (this.cursor) q.push('last_event_id=' + encodeURIComponent(cursorString(this.cursor)));
    return q.length ? this.url + (this.url.indexOf('?') === -1 ? '?' : '&') + q.join('&') : this.url;
  };

  Subscription.prototype.opened = function () {
    clearTimeout(this.guard);
    this.attempt = 0;
    this.worked = true;
  };

  // The stream ended without a final word. Before it ever opened, a transport that never
  // worked gives way to the next one at once; anything else is a drop: back off, then try the
  // same transport again (after a probe poll when it could not open).
  Subscription.prototype.dropped = function (wasOpen, status) {
    clearTimeout(this.guard);
    this.stream = null;
    if (!this.running) return;
    if (!wasOpen && !this.worked && this.index < this.transports.length - 1) {
      this.index++;
      this.connect();
      return;
    }
    if (!wasOpen) this.probe = true;
    this.fail(status);
  };

  // "410 Gone: channel deleted", "503 shutting down", ...: true when it stopped the subscription.
  Subscription.prototype.ended = function (reason) {
    var status = parseInt(reason, 10);
    if (!FINAL[status]) return false;
    this.stop();
    this.onClose(status, this);
    return true;
  };

  Subscription.prototype.openWebSocket = function () {
    var self = this, open = false, ws;
    try {
      ws = new root.WebSocket(wsUrl(this.streamUrl()), 'ws+meta.comet');
    } catch (e) {
      this.dropped(false, 0); // a URL the browser refuses (e.g. ws: from an https page)
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.stream = ws;
    this.guard = setTimeout(function () {
      if (self.stream !== ws || open) return;
      self.stream = null;
      try { ws.close(); } catch (e) { /* closing */ }
      self.dropped(false, 0);
    }, this.opts.openTimeout || OPEN_TIMEOUT);
    ws.onopen = function () { if (self.stream === ws) { open = true; self.opened(); } };
    ws.onmessage = function (ev) {
      if (self.stream !== ws) return;
      var f = parseFrame(ev.data);
      self.take(f.body, f.id, f.type, f.channel, f.bytes);
    };
    // Every error is followed by a close, so close alone decides. Pings are answered by the
    // browser itself.
    ws.onclose = function (ev) {
      if (self.stream !== ws) return;
      self.stream = null;
      if (open && self.ended(ev.reason)) return;
      self.dropped(open, parseInt(ev.reason, 10) || 0);
    };
  };

  Subscription.prototype.openEventSource = function () {
    var self = this, open = false, es;
    try {
      es = new root.EventSource(this.streamUrl(), { withCredentials: this.opts.withCredentials !== false });
    } catch (e) {
      this.dropped(false, 0);
      return;
    }
    this.stream = es;
    this.guard = setTimeout(function () {
      if (self.stream !== es || open) return;
      self.stream = null;
      es.close();
      self.dropped(false, 0);
    }, this.opts.openTimeout || OPEN_TIMEOUT);
    es.onopen = function () { if (self.stream === es) { open = true; self.opened(); } };
    // No content type nor channel on the wire: the subscribed channel is the right one (@me,
    // where it would not be, never comes here).
    es.onmessage = function (ev) {
      if (self.stream === es) self.take(ev.data, parseCursor(ev.lastEventId), '', null, null);
    };
    es.addEventListener('close', function (ev) {
      if (self.stream !== es) return;
      self.stream = null;
      es.close();
      if (!self.ended(ev.data)) self.dropped(true, parseInt(ev.data, 10) || 0);
    });
    // The browser would reconnect by itself, but without the backoff, the fallback and the
    // onError the page expects: close it and reconnect here, with the cursor in the URL.
    es.onerror = function () {
      if (self.stream !== es) return;
      self.stream = null;
      es.close();
      self.dropped(open, 0);
    };
  };

  // One message from a stream.
  Subscription.prototype.take = function (body, id, type, channel, bytes) {
    if (id) { this.cursor = id; this.save(); }
    var meta = {
      id: cursorString(id), time: id ? id.time : null, tag: id ? id.tag : null,
      channel: channel || this.channel, subscription: this.channel, contentType: type, batch: null
    };
    if (bytes) meta.bytes = bytes;
    this.emit(body, meta);
  };

  // onMessage for one message (parsed under json), guarded against the page's own errors.
  Subscription.prototype.emit = function (raw, meta) {
    var data = raw;
    if (this.opts.json) {
      try { data = JSON.parse(raw); } catch (e) { this.onError(200, this, e, raw); return; }
    }
    try {
      this.onMessage(data, meta, this);
    } catch (e) {
      // A bug in the page's handler must not stop the stream (nor be retried): report it.
      setTimeout(function () { throw e; }, 0);
    }
  };

  Subscription.prototype.clearTimer = function () {
    if (this.timer) { clearTimeout(this.timer); this.timer = null; }
  };

  Subscription.prototype.poll = function () {
    if (!this.running) return;
    var self = this, o = this.opts, url = this.url, q = [];
    if (o.query) q.push(String(o.query).replace(/^[?&]/, ''));
    // The cursor goes in the query (no CORS preflight, nchan's way) or in the headers.
    if (this.cursor && o.cursorIn === 'query') q.push('last_event_id=' + encodeURIComponent(cursorString(this.cursor)));
    if (q.length) url += (url.indexOf('?') === -1 ? '?' : '&') + q.join('&');
    var x = new XMLHttpRequest(), timedOut = false;
    this.xhr = x;
    x.open('GET', url, true);
    x.withCredentials = o.withCredentials !== false;
    if (o.timeout !== 0) {
      // A poll unanswered past this is presumed dead (a half-open TCP connection after a
      // network change): replace it at once, without counting an error.
      this.guard = setTimeout(function () { timedOut = true; x.abort(); }, o.timeout || 75000);
    }
    if (this.cursor && o.cursorIn !== 'query') {
      x.setRequestHeader('If-Modified-Since', new Date(this.cursor.time * 1000).toUTCString());
      x.setRequestHeader('If-None-Match', String(this.cursor.tag));
    }
    if (o.multipart !== false) x.setRequestHeader('Accept', 'multipart/mixed, */*;q=0.5');
    x.onreadystatechange = function () {
      if (x.readyState !== 4 || self.xhr !== x) return;
      clearTimeout(self.guard);
      self.xhr = null;
      if (timedOut) self.poll();
      else self.done(x);
    };
    x.send();
  };

  Subscription.prototype.done = function (x) {
    if (!this.running) return;
    var status = x.status;
    // Long-poll reached as a fallback, and even it got no answer: the daemon is down, not the
    // streams refused. The next try starts again from the first transport.
    if (status !== 0) this.worked = true;
    else if (!this.worked && !this.probe) this.index = 0;
    if (status === 200) {
      this.attempt = 0;
      try { this.deliver(x); } catch (e) { this.fail(status, e); return; }
      this.again();
    } else if (status === 408 || status === 304 || status === 204) {
      // Nothing new within the hold time: poll again at once, with the echoed cursor if any.
      this.attempt = 0;
      this.cursor = cursorFrom(x.getResponseHeader('Last-Modified'), x.getResponseHeader('Etag')) || this.cursor;
      this.again();
    } else if (FINAL[status]) {
      this.stop();
      this.onClose(status, this);
    } else {
      // 0 (network error, daemon down), 5xx, 429, ...: back off and try again.
      var after = parseFloat(x.getResponseHeader('Retry-After'));
      if (status === 503) this.cursor = cursorFrom(x.getResponseHeader('Last-Modified'), x.getResponseHeader('Etag')) || this.cursor;
      this.fail(status, null, isNaN(after) ? 0 : after * 1000);
    }
  };

  // Calls onMessage for the message(s) of a 200 answer and moves the cursor past them.
  Subscription.prototype.deliver = function (x) {
    var type = x.getResponseHeader('Content-Type') || '';
    var boundary = boundaryOf(type);
    var msgs = [];
    var last = cursorFrom(x.getResponseHeader('Last-Modified'), x.getResponseHeader('Etag'));
    var chan = x.getResponseHeader('X-Comet-Channel');
    if (boundary) {
      var parts = parseMultipart(x.responseText || '', boundary);
      for (var i = 0; i < parts.length; i++) {
        var h = parts[i].headers;
        var id = cursorFrom(h['last-modified'], h.etag);
        if (i === parts.length - 1) id = last || id; // the response's cursor is the batch's end
        msgs.push({ data: parts[i].body, id: id, type: h['content-type'] || '', channel: h['x-comet-channel'] || chan });
      }
    } else {
      msgs.push({ data: x.responseText || '', id: last, type: type, channel: chan });
    }
    for (var j = 0; j < msgs.length; j++) {
      var m = msgs[j];
      if (m.id) this.cursor = m.id;
      if (j === msgs.length - 1 && last) this.cursor = last;
      this.save();
      var meta = {
        id: cursorString(m.id), time: m.id ? m.id.time : null, tag: m.id ? m.id.tag : null,
        channel: m.channel || this.channel, subscription: this.channel, contentType: m.type,
        batch: msgs.length > 1 ? { index: j, size: msgs.length } : null
      };
      this.emit(m.data, meta);
      if (!this.running) return; // stopped from inside onMessage
    }
  };

  Subscription.prototype.fail = function (status, error, minDelay) {
    this.attempt++;
    var o = this.opts, min = o.retryMin || 1000, max = o.retryMax || 30000;
    var d = Math.min(max, min * Math.pow(2, Math.min(this.attempt - 1, 20)));
    // Jitter: a daemon restart must not see every page come back in the same millisecond.
    d = Math.max(d / 2 + Math.random() * d / 2, (minDelay || 0) * (1 + Math.random() * 0.5));
    if (!unloading) this.onError(status, this, error || null, d);
    if (!this.running) return;
    var self = this;
    this.clearTimer();
    this.timer = setTimeout(function () { self.timer = null; self.connect(); }, d);
  };

  /** Several subscriptions stopped together. */
  function Group(subs) { this.subs = subs; }
  Group.prototype.stop = function () {
    for (var i = 0; i < this.subs.length; i++) this.subs[i].stop();
    return this;
  };

  return {
    version: '1.1.0',
    /**
     * Comet.subscribe(base, channel | [channels], options) -> Subscription (or a Group with
     * .subs and .stop() for an array). base: where the daemon's browser listener is mounted
     * ("/push", "https://push.site.com"); channel: a channel id, or "@me" for the session's
     * private stream.
     */
    subscribe: function (base, channel, opts) {
      if (Object.prototype.toString.call(channel) === '[object Array]') {
        var subs = [];
        for (var i = 0; i < channel.length; i++) subs.push(new Subscription(base, channel[i], opts));
        return new Group(subs);
      }
      return new Subscription(base, channel, opts);
    },
    Subscription: Subscription,
    // Exposed for tests.
    _parseMultipart: parseMultipart,
    _cursorFrom: cursorFrom,
    _parseFrame: parseFrame,
    _wsUrl: wsUrl
  };
});
