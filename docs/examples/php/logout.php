<?php
/**
 * Logout: close the session's private channel on comet, then end PHP's session. A poll held on
 * `/sub/@me` is answered 410 at once (comet.js calls the page's onClose(410)), and every later
 * poll of that session id gets 403.
 *
 *   POST logout.php                  -> 200 {"closed":1}  (1: the channel was open)
 */

declare(strict_types=1);
require __DIR__ . '/comet.php';

header('Content-Type: application/json');
session_start();
$sid = session_id();
$closed = 0;
try {
    $closed = (int)comet_redis()->rawCommand('SESSION.CLOSE', $sid);
} catch (RedisException $e) {
    error_log('comet: ' . $e->getMessage());
}
$_SESSION = [];
$p = session_get_cookie_params();
setcookie(session_name(), '', [
    'expires' => time() - 3600, 'path' => $p['path'], 'domain' => $p['domain'],
    'secure' => $p['secure'], 'httponly' => $p['httponly'], 'samesite' => $p['samesite'] ?: 'Lax',
]);
session_destroy();
echo json_encode(['closed' => $closed]);
