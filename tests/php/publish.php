<?php
// Publishes one message through comet's control socket with phpredis, as a PHP backend would.
// Usage: php publish.php HOST PORT TOKEN CHANNEL MESSAGE
// Prints the PUBLISH reply (the number of held polls that got the message).
if ($argc != 6) {
    fwrite(STDERR, "usage: php publish.php HOST PORT TOKEN CHANNEL MESSAGE\n");
    exit(2);
}
[, $host, $port, $token, $ch, $msg] = $argv;
$r = new Redis();
$r->connect($host, (int)$port, 5.0);
$r->auth(['php', $token]);
echo $r->publish($ch, $msg);
