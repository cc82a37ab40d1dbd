<?php
/**
 * POST /login.php user=<name>: a new PHP session for that name, its private channel opened on
 * comet (SESSION.OPEN <session_id()> <name>), and the users table pointing the name at it so
 * others can send private messages. No password: this is a demo.
 */

declare(strict_types=1);
require __DIR__ . '/lib.php';

require_post();
$user = trim((string)($_POST['user'] ?? ''));
if (!preg_match('/^[A-Za-z0-9_.-]{1,24}$/', $user)) {
    json_out(['error' => 'a name is 1 to 24 of A-Z a-z 0-9 _ . -'], 400);
}
$previous = session_id();
session_regenerate_id(true); // no session fixation: the id changes at login
$_SESSION['user'] = $user;
$_SESSION['login'] = bin2hex(random_bytes(6)); // names this login's stored stream position

if ($c = comet()) {
    $c->rawCommand('SESSION.CLOSE', $previous);
}
// The name moves to this session; a previous session of the same name stops getting messages.
$old = db()->prepare('SELECT sid FROM users WHERE name = ?');
$old->execute([$user]);
$oldSid = $old->fetchColumn();
if ($oldSid !== false && $oldSid !== session_id() && ($c = comet())) {
    $c->rawCommand('SESSION.CLOSE', $oldSid);
}
db()->prepare('INSERT OR REPLACE INTO users (name, sid, since) VALUES (?, ?, ?)')
    ->execute([$user, session_id(), time()]);
open_stream($user);

if (wants_json()) {
    json_out(['user' => $user]);
}
header('Location: /', true, 303);
