<?php
/**
 * Signed subscribe keys: a page may read a channel without an access check when its poll URL
 * carries `key=...&expires=...` that PHP signed (`[auth] key_secret` set on comet; with
 * `[auth] mode = "key"` nothing else opens a channel). Two ways to get one:
 *
 * 1. ask comet: `SIGN <channel> [sid] [ttl]` answers the query string ready to append;
 * 2. compute it in PHP with the same secret, no round trip:
 *    key = hex(HMAC-SHA256(secret, "<channel>|<sid>|<expires>")), sid "" for any session.
 *
 * In a page: $q = $redis->rawCommand('SIGN', 'goods', session_id(), 3600); then in JS
 * Comet.subscribe('/push', 'goods', {query: <?= json_encode($q) ?>, ...}).
 *
 *   php sign.php [--host= --port= --token= --key-secret=] CHANNEL [SID] [TTL]
 *
 * Prints two lines, "sign: <query>" (from comet) and "hmac: <query>" (computed here; needs
 * --key-secret or COMET_KEY_SECRET).
 */

declare(strict_types=1);
require __DIR__ . '/comet.php';

/** The query string that lets session `$sid` ("" for any) read `$channel` for `$ttl` seconds. */
function comet_sign(string $secret, string $channel, string $sid, int $ttl): string
{
    $expires = time() + $ttl;
    $key = hash_hmac('sha256', "$channel|$sid|$expires", $secret);
    return http_build_query(['key' => $key, 'expires' => $expires]);
}

$args = comet_args();
if (count($args) < 1 || count($args) > 3) {
    fwrite(STDERR, "usage: php sign.php [--host= --port= --token= --key-secret=] CHANNEL [SID] [TTL]\n");
    exit(2);
}
[$channel, $sid, $ttl] = [$args[0], $args[1] ?? '', (int)($args[2] ?? 3600)];

try {
    $q = comet_redis()->rawCommand('SIGN', $channel, $sid, $ttl);
} catch (RedisException $e) {
    fwrite(STDERR, 'comet: ' . $e->getMessage() . "\n");
    exit(1);
}
if (!is_string($q)) {
    fwrite(STDERR, "comet refused SIGN (is [auth] key_secret set?)\n");
    exit(1);
}
echo "sign: $q\n";

$secret = comet_settings()['key_secret'];
if ($secret !== '') {
    echo 'hmac: ', comet_sign($secret, $channel, $sid, $ttl), "\n";
}
