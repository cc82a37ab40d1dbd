<?php
/**
 * comet access-check callback, for `[auth] mode = "http"`.
 *
 * comet calls this script (GET) when a browser polls a shared channel that is neither listed in
 * `open_channels` nor opened by a signed key, and no cached answer is fresh. The request carries:
 *
 *   Cookie:           the browser's own Cookie header, so PHP's session works as on any page
 *   X-Comet-Channel:  the channel asked for ("goods", "room:7", ...)
 *   X-Comet-Session:  the session cookie's value as comet read it ("" when none)
 *   X-Forwarded-For:  the browser's address (as comet saw it: nginx's, behind a proxy)
 *   X-Original-URI:   the poll's request target ("/sub/goods?last_event_id=...")
 *
 * The answer decides:
 *
 *   2xx               allowed; an `X-Comet-User: <user id>` header names the user
 *   4xx / 5xx         denied: the browser gets this very status (403, 401, 404, ...)
 *   no answer in time denied: the browser gets 504 after [workers] job_timeout_ms; a refused
 *                     connection or a broken answer gives 403
 *
 * comet caches allowed and denied answers per (session, channel) for `cache_ttl_secs`; after
 * changing a user's rights call `AUTH.FLUSH SESSION <sid>` on the control socket.
 *
 * Run it anywhere PHP runs: behind your web server (keep the URL reachable from comet only), or
 * for a try with PHP's built-in server, which serves every path with this script:
 *
 *   php -S 127.0.0.1:8080 docs/examples/php/comet-auth.php
 *
 * and in server.toml:
 *
 *   [auth]
 *   mode = "http"
 *   url = "http://127.0.0.1:8080/comet-auth"
 *   open_channels = ["news:*"]
 *
 * This example reads the user from the PHP session the login page wrote (login.php next to this
 * file sets $_SESSION['user']; add the channels the user may read):
 *
 *   $_SESSION['user']     = 'alice';
 *   $_SESSION['channels'] = ['goods', 'room:7'];
 *
 * Replace may_read() with your own rule (usually a query on your database).
 */

declare(strict_types=1);

/** Ends the request with `$status` and a short reason (comet passes the status to the browser). */
function answer(int $status, string $reason, ?string $user = null): never
{
    http_response_code($status);
    header('Content-Type: text/plain; charset=utf-8');
    header('Cache-Control: no-store');
    if ($user !== null) {
        header('X-Comet-User: ' . $user);
    }
    echo $reason, "\n";
    exit;
}

/** Whether user `$user` may read `$channel`. Put your rule here, e.g. with PDO:
 *    SELECT 1 FROM channel_access WHERE channel = ? AND user_id = ?
 *  This example uses the list the login page kept in the session. */
function may_read(string $user, string $channel): bool
{
    return in_array($channel, $_SESSION['channels'] ?? [], true);
}

$channel = (string)($_SERVER['HTTP_X_COMET_CHANNEL'] ?? '');
if ($channel === '') {
    // Not called by comet (or a proxy dropped the header): refuse rather than guess.
    answer(400, 'missing X-Comet-Channel');
}

// Demo only, used by comet's tests: with COMET_AUTH_DEMO=1 in the environment, the channel "slow"
// takes 2 seconds to check, like an overloaded application. comet keeps serving everyone else
// meanwhile (the check runs on a worker thread, never on comet's event loop).
if ($channel === 'slow' && getenv('COMET_AUTH_DEMO') === '1') {
    sleep(2);
}

// Not logged in at all: 401 (the page may send the user to the login form).
$sid = (string)($_COOKIE[session_name()] ?? '');
if ($sid === '') {
    answer(401, 'not logged in');
}
// A session id PHP would refuse (session ids use [A-Za-z0-9,-]): unknown session.
if (!preg_match('/^[A-Za-z0-9,-]{1,128}$/', $sid)) {
    answer(403, 'unknown session');
}

// Read the session without keeping its lock: comet may check many channels of one user at once.
// strict mode: an id PHP never issued is not adopted as a new session.
session_start(['read_and_close' => true, 'use_strict_mode' => true]);
if (session_id() !== $sid || !isset($_SESSION['user'])) {
    answer(403, 'unknown session');
}
$user = (string)$_SESSION['user'];

if (!may_read($user, $channel)) {
    answer(403, 'channel not allowed');
}
answer(200, 'ok', $user);
