<?php
/**
 * POST /bid.php amount=<n>: a bid above the current price becomes the price, and every open
 * page hears of it through the shared channel `goods`.
 */

declare(strict_types=1);
require __DIR__ . '/lib.php';

require_post();
$user = require_user();
$amount = filter_var($_POST['amount'] ?? '', FILTER_VALIDATE_INT);
if ($amount === false) {
    json_out(['error' => 'the amount is a whole number'], 400);
}
$db = db();
$db->exec('BEGIN IMMEDIATE'); // read and raise the price under one write lock
$row = $db->query('SELECT price, bidder FROM auction WHERE id = 1')->fetch();
if ($amount <= (int)$row['price']) {
    $db->exec('ROLLBACK');
    json_out(['error' => "the price is already {$row['price']}", 'price' => (int)$row['price']], 409);
}
$now = time();
$db->prepare('UPDATE auction SET price = ?, bidder = ?, at = ? WHERE id = 1')->execute([$amount, $user, $now]);
$db->exec('COMMIT');
// After the commit: a page that hears of the bid and reloads finds it in the database.
$n = publish(GOODS, ['type' => 'bid', 'price' => $amount, 'bidder' => $user, 'at' => $now]);
json_out(['price' => $amount, 'bidder' => $user, 'delivered' => $n]);
