<?php
/**
 * Login: start PHP's session, then open the session's private channel on comet, so that the
 * browser may poll `/sub/@me` and PHP may publish to `session:<session_id()>` for this visitor
 * alone. A page of a logged-in user may call SESSION.OPEN again at any time (it is idempotent:
 * after a comet restart, which forgets open sessions, the next page view opens it again).
 *
 *   POST login.php   user=alice       -> 200 {"user":"alice"} and the PHPSESSID cookie
 *
 * Try it: php -S 127.0.0.1:8080 -t docs/examples/php   (COMET_PORT / COMET_TOKEN in the env)
 * A real site checks a password first; this one takes any well-formed name.
 */

declare(strict_types=1);
require __DIR__ . '/comet.php';

header('Content-Type: application/json');
if ($_SERVER['REQUEST_METHOD'] !== 'POST') {
    http_response_code(405);
    header('Allow: POST');
    exit(json_encode(['error' => 'POST user=<name>']));
}
$user = trim((string)($_POST['user'] ?? ''));
if (!preg_match('/^[A-Za-z0-9_.-]{1,32}$/', $user)) {
    http_response_code(400);
    exit(json_encode(['error' => 'a user name is 1 to 32 of A-Z a-z 0-9 _ . -']));
}

session_start();
$previous = session_id();
// A new session id at login, so that an id planted before it (session fixation) is worthless.
session_regenerate_id(true);
$_SESSION['user'] = $user;

try {
    $redis = comet_redis();
    // The id the visitor had before logging in must not keep a private stream.
    $redis->rawCommand('SESSION.CLOSE', $previous);
    // The second argument names the user in presence (ONLINE, PRESENCE, __presence__ events).
    $redis->rawCommand('SESSION.OPEN', session_id(), $user);
} catch (RedisException $e) {
    // The login itself worked; only live updates are missing until comet is back.
    error_log('comet: ' . $e->getMessage());
}
echo json_encode(['user' => $user]);
