<?php
/**
 * POST /message.php to=<name> text=<text>: a private message, published on the addressee's
 * private channel `session:<their session id>`: only their pages get it.
 */

declare(strict_types=1);
require __DIR__ . '/lib.php';

require_post();
$user = require_user();
$to = trim((string)($_POST['to'] ?? ''));
$text = trim((string)($_POST['text'] ?? ''));
if ($text === '' || strlen($text) > 2000) {
    json_out(['error' => 'a message is 1 to 2000 bytes'], 400);
}
$q = db()->prepare('SELECT sid FROM users WHERE name = ?');
$q->execute([$to]);
$sid = $q->fetchColumn();
if ($sid === false) {
    json_out(['error' => "$to is not logged in"], 404);
}
$n = publish("session:$sid", ['type' => 'message', 'from' => $user, 'to' => $to, 'text' => $text, 'at' => time()]);
json_out(['to' => $to, 'delivered' => $n]);
