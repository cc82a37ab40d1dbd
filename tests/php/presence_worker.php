<?php
// A PHP backend worker that follows comet's presence events with phpredis, as an application
// would (e.g. to mark users online in its own tables): SUBSCRIBE __presence__ and print each
// event's payload on its own line, flushed at once, then exit after N events.
//
// Usage: php presence_worker.php HOST PORT TOKEN N
// Exit codes: 0 after N events; 2 usage; 3 a message on another channel; 4 connection error.
if ($argc != 5) {
    fwrite(STDERR, "usage: php presence_worker.php HOST PORT TOKEN N\n");
    exit(2);
}
[, $host, $port, $token, $n] = $argv;
$want = (int)$n;
$seen = 0;
$bad = null;
try {
    $r = new Redis();
    $r->connect($host, (int)$port, 5.0);
    $r->auth(['php', $token]);
    // A subscriber waits for events as long as it takes: no read timeout.
    $r->setOption(Redis::OPT_READ_TIMEOUT, -1);
    $r->subscribe(['__presence__'], function ($redis, $chan, $msg) use (&$seen, &$bad, $want) {
        if ($chan !== '__presence__') {
            $bad = "message on unexpected channel " . var_export($chan, true) . ": $msg";
            $redis->close();
            return;
        }
        echo "$msg\n";
        fflush(STDOUT);
        if (++$seen >= $want) {
            // exit() here does not end the process: PHP 8 unwinds exit() like an exception,
            // which phpredis' subscribe loop never checks, so it would go on reading forever
            // without calling us. Closing the connection ends the loop with an exception.
            $redis->close();
        }
    });
} catch (RedisException $e) {
    if ($bad !== null) {
        fwrite(STDERR, "$bad\n");
        exit(3);
    }
    if ($seen >= $want) {
        exit(0);
    }
    fwrite(STDERR, "redis error after $seen events: " . $e->getMessage() . "\n");
    exit(4);
}
// subscribe() returned without N events: the connection ended.
fwrite(STDERR, "subscribe returned after $seen of $want events\n");
exit(4);
