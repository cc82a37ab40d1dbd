<?php
/**
 * A long-running presence worker: follows comet's presence events (SUBSCRIBE __presence__) and
 * keeps the application's view of who is online up to date, with phpredis.
 *
 * - `--state=FILE`: keeps {"online": {sid: user}, "channels": {channel: {sid: user}}} in a JSON
 *   file, replaced atomically after every event, for any PHP page to read.
 * - `--publish=goods,room:7`: after a session joins or leaves one of these channels, asks comet
 *   `PRESENCE <channel>` and publishes {"channel", "users", "sessions"} to `presence:<channel>`,
 *   so the pages that show "who is online" update live (they subscribe to that channel, or PHP
 *   JOINs their sessions to it).
 * - Prints each event on its own line.
 *
 *   php presence-worker.php [--host= --port= --token=] [--state=FILE] [--publish=CH,...]
 *                           [--max-events=N] [--idle-timeout=SECS]
 *
 * It runs until stopped; with --max-events it exits 0 after N events, with --idle-timeout it
 * exits 3 after that many seconds without any event (both for tests and cron-style runs). When
 * comet goes away it reconnects every second and rebuilds its state from ONLINE and PRESENCE.
 * Run it under systemd or supervisord in production, one per application.
 */

declare(strict_types=1);
require __DIR__ . '/comet.php';

$opts = comet_options();
$stateFile = $opts['state'] ?? '';
$publish = array_values(array_filter(explode(',', $opts['publish'] ?? '')));
$maxEvents = (int)($opts['max-events'] ?? 0);
$idle = (float)($opts['idle-timeout'] ?? 0);

/** Who is online and on which channel, as this worker knows it. */
$state = ['online' => [], 'channels' => []];
$seen = 0;

/** Flat [sid1, user1, sid2, user2, ...] (ONLINE, PRESENCE) -> [sid => user]. */
function pairs($flat): array
{
    $out = [];
    for ($i = 0; is_array($flat) && $i + 1 < count($flat); $i += 2) {
        $out[(string)$flat[$i]] = (string)$flat[$i + 1];
    }
    return $out;
}

function save_state(string $file, array $state): void
{
    if ($file === '') {
        return;
    }
    $json = json_encode([
        'online' => (object)$state['online'],
        'channels' => (object)array_map(fn ($c) => (object)$c, $state['channels']),
        'updated' => time(),
    ], JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES);
    // Write then rename: a page reading the file never sees half of it.
    $tmp = $file . '.' . getmypid() . '.tmp';
    file_put_contents($tmp, $json . "\n");
    rename($tmp, $file);
}

/** Publishes who is on `$channel` to `presence:$channel`, from comet's own answer. */
function publish_presence(Redis $cmd, string $channel): void
{
    $on = pairs($cmd->rawCommand('PRESENCE', $channel));
    $users = array_values(array_unique(array_filter(array_values($on), 'strlen')));
    sort($users);
    $cmd->publish("presence:$channel", json_encode([
        'channel' => $channel,
        'users' => $users,
        'sessions' => count($on),
        'at' => time(),
    ]));
}

/** Applies one event ("online <sid> [user]", "offline <sid>", "join <sid> <ch>", "leave <sid> <ch>"). */
function apply_event(array &$state, string $msg): ?string
{
    $w = explode(' ', $msg, 3);
    [$kind, $sid, $arg] = [$w[0], $w[1] ?? '', $w[2] ?? ''];
    switch ($kind) {
        case 'online':
            $state['online'][$sid] = $arg;
            return null;
        case 'offline':
            unset($state['online'][$sid]);
            foreach ($state['channels'] as $ch => $_) {
                unset($state['channels'][$ch][$sid]);
            }
            return null;
        case 'join':
            $state['channels'][$arg][$sid] = $state['online'][$sid] ?? '';
            return $arg;
        case 'leave':
            unset($state['channels'][$arg][$sid]);
            if (empty($state['channels'][$arg])) {
                unset($state['channels'][$arg]);
            }
            return $arg;
    }
    return null;
}

$lastEvent = microtime(true);
$done = false;
for (;;) {
    try {
        $sub = comet_redis(5.0);
        // A second connection for commands: a subscribed connection may only (UN)SUBSCRIBE.
        $cmd = comet_redis(5.0);
        // Who was online before this worker (re)started. An event may arrive for a session
        // seen here too; applying it again is harmless.
        $state['online'] = pairs($cmd->rawCommand('ONLINE'));
        $state['channels'] = [];
        foreach ($publish as $ch) {
            $state['channels'][$ch] = pairs($cmd->rawCommand('PRESENCE', $ch));
            publish_presence($cmd, $ch);
        }
        save_state($stateFile, $state);
        $sub->setOption(Redis::OPT_READ_TIMEOUT, $idle > 0 ? $idle : -1);
        $sub->subscribe(['__presence__'], function ($redis, $chan, $msg) use (&$state, &$seen, &$lastEvent, &$done, $cmd, $publish, $stateFile, $maxEvents) {
            $lastEvent = microtime(true);
            $ch = apply_event($state, $msg);
            save_state($stateFile, $state);
            if ($ch !== null && in_array($ch, $publish, true)) {
                publish_presence($cmd, $ch);
            }
            echo $msg, "\n";
            fflush(STDOUT);
            if ($maxEvents > 0 && ++$seen >= $maxEvents) {
                // phpredis (5.x) keeps reading after exit(), an exception or unsubscribe() in a
                // callback, until the next message or read timeout: closing the connection is
                // what ends subscribe() at once (it then throws, caught below).
                $done = true;
                $redis->close();
            }
        });
    } catch (RedisException $e) {
        if ($done) {
            exit(0);
        }
        if ($idle > 0 && microtime(true) - $lastEvent >= $idle - 0.1) {
            fwrite(STDERR, "presence-worker: no event for {$idle} s, exiting\n");
            exit(3);
        }
        fwrite(STDERR, 'presence-worker: ' . $e->getMessage() . "; reconnecting in 1 s\n");
    }
    sleep(1);
}
