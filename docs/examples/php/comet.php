<?php
/**
 * Shared by the examples: where comet's control socket is, and a phpredis connection to it.
 *
 * Settings come from `--host=`, `--port=`, `--token=` (and `--key-secret=`) on the command line,
 * else from the environment (COMET_HOST, COMET_PORT, COMET_TOKEN, COMET_KEY_SECRET, which is how a
 * web server hands them to pages), else server.toml's defaults. In your application this is
 * three lines of configuration; nothing here is needed by comet itself.
 */

declare(strict_types=1);

/** The settings: ['host' => ..., 'port' => ..., 'token' => ..., 'key_secret' => ...]. */
function comet_settings(): array
{
    $opts = comet_options();
    $pick = fn (string $opt, string $env, string $default): string =>
        (string)($opts[$opt] ?? (getenv($env) !== false ? getenv($env) : $default));
    return [
        'host' => $pick('host', 'COMET_HOST', '127.0.0.1'),
        'port' => (int)$pick('port', 'COMET_PORT', '8101'),
        'token' => $pick('token', 'COMET_TOKEN', 'change-me-php-secret'),
        'key_secret' => $pick('key-secret', 'COMET_KEY_SECRET', ''),
    ];
}

/** `--name=value` options of the command line (none in a web request). */
function comet_options(): array
{
    $out = [];
    foreach (array_slice($GLOBALS['argv'] ?? [], 1) as $a) {
        if (preg_match('/^--([a-z-]+)=(.*)$/s', $a, $m)) {
            $out[$m[1]] = $m[2];
        }
    }
    return $out;
}

/** The command line's other arguments, in order. */
function comet_args(): array
{
    return array_values(array_filter(
        array_slice($GLOBALS['argv'] ?? [], 1),
        fn (string $a): bool => !preg_match('/^--[a-z-]+=/', $a)
    ));
}

/**
 * A phpredis connection to the control socket, authenticated. comet takes `AUTH <secret>` as
 * well as `AUTH <name> <secret>` (phpredis: `$redis->auth(['php', $secret])`).
 */
function comet_redis(float $timeout = 2.0): Redis
{
    $s = comet_settings();
    $redis = new Redis();
    // In PHP-FPM use pconnect() to keep one connection per worker process across requests.
    $redis->connect($s['host'], $s['port'], $timeout);
    if ($s['token'] !== '') {
        $redis->auth($s['token']);
    }
    return $redis;
}
