<?php
/**
 * POST /logout.php: closes the private channel (SESSION.CLOSE: a poll held on @me gets 410 at
 * once, later ones 403), forgets the name, and ends the PHP session.
 */

declare(strict_types=1);
require __DIR__ . '/lib.php';

require_post();
$sid = session_id();
$closed = 0;
if ($c = comet()) {
    $closed = (int)$c->rawCommand('SESSION.CLOSE', $sid);
}
db()->prepare('DELETE FROM users WHERE sid = ?')->execute([$sid]);
$_SESSION = [];
$p = session_get_cookie_params();
setcookie(session_name(), '', ['expires' => time() - 3600, 'path' => $p['path'], 'httponly' => true, 'samesite' => 'Lax']);
session_destroy();

if (wants_json()) {
    json_out(['closed' => $closed]);
}
header('Location: /', true, 303);
