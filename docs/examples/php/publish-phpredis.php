<?php
/**
 * Publishing with phpredis: what a PHP page does after it changed something that open pages
 * show. PUBLISH answers how many waiting browsers (and subscribed backends) got the message at
 * once; the message is buffered either way, so a browser between two polls still gets it.
 *
 *   php publish-phpredis.php [--host=127.0.0.1 --port=8101 --token=...] CHANNEL [MESSAGE]
 *
 * Without MESSAGE it publishes a JSON object, as an application usually does. Prints the
 * PUBLISH reply.
 */

declare(strict_types=1);
require __DIR__ . '/comet.php';

$args = comet_args();
if (count($args) < 1 || count($args) > 2) {
    fwrite(STDERR, "usage: php publish-phpredis.php [--host= --port= --token=] CHANNEL [MESSAGE]\n");
    exit(2);
}
$channel = $args[0];
$message = $args[1] ?? json_encode(['price' => 42, 'at' => time()]);

try {
    $redis = comet_redis();
    $n = $redis->publish($channel, $message);
} catch (RedisException $e) {
    fwrite(STDERR, "comet: " . $e->getMessage() . "\n");
    exit(1);
}
if ($n === false) {
    // A -ERR reply (an invalid channel id, ...): phpredis keeps its text.
    fwrite(STDERR, "comet refused: " . $redis->getLastError() . "\n");
    exit(1);
}
echo $n, "\n";
