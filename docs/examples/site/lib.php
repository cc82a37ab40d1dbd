<?php
/**
 * The auction site's shared code: settings, the SQLite database, the PHP session, and comet.
 *
 * Settings come from the environment, as scripts/demo passes them to `php -S`:
 *   COMET_HOST, COMET_PORT, COMET_TOKEN   comet's control socket (see ../php/comet.php)
 *   COMET_SITE_DATA                       where site.sqlite lives (default: the temp dir)
 */

declare(strict_types=1);
require __DIR__ . '/../php/comet.php';

/** What is for sale. */
const ITEM = 'Olivetti Lettera 22 typewriter, 1962, with its case';
/** The channels: every visitor's prices, and who is on it (published by the presence worker). */
const GOODS = 'goods';
const PRESENCE_GOODS = 'presence:goods';

session_set_cookie_params(['path' => '/', 'httponly' => true, 'samesite' => 'Lax']);
session_start();

function db(): PDO
{
    static $pdo = null;
    if ($pdo !== null) {
        return $pdo;
    }
    $dir = getenv('COMET_SITE_DATA') ?: sys_get_temp_dir() . '/comet-site';
    if (!is_dir($dir)) {
        mkdir($dir, 0700, true);
    }
    $pdo = new PDO('sqlite:' . $dir . '/site.sqlite', null, null, [
        PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
        PDO::ATTR_DEFAULT_FETCH_MODE => PDO::FETCH_ASSOC,
        PDO::ATTR_TIMEOUT => 5, // php -S runs several workers: wait for a lock, do not fail
    ]);
    $pdo->exec('PRAGMA journal_mode = WAL');
    // users: who is logged in, and the session id their private channel is named after.
    $pdo->exec('CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, sid TEXT NOT NULL, since INTEGER NOT NULL)');
    $pdo->exec('CREATE TABLE IF NOT EXISTS auction (id INTEGER PRIMARY KEY CHECK (id = 1),
                price INTEGER NOT NULL, bidder TEXT NOT NULL, at INTEGER NOT NULL)');
    $pdo->exec("INSERT OR IGNORE INTO auction VALUES (1, 100, '', 0)");
    return $pdo;
}

/** The logged-in user's name, or null. */
function current_user(): ?string
{
    return isset($_SESSION['user']) ? (string)$_SESSION['user'] : null;
}

/** A connection to comet, or null when it is down (pages still work, without live updates). */
function comet(): ?Redis
{
    static $redis = null;
    if ($redis === null) {
        try {
            $redis = comet_redis(1.0);
        } catch (RedisException $e) {
            error_log('comet: ' . $e->getMessage());
            return null;
        }
    }
    return $redis;
}

/**
 * Opens this session's private stream (`@me`) and joins it to `presence:goods`, so one poll
 * carries private messages and the "who is online" list. Idempotent: every page view of a
 * logged-in user calls it, so that a restarted comet (which forgets open sessions) is caught up.
 */
function open_stream(string $user): void
{
    $c = comet();
    if ($c === null) {
        return;
    }
    $c->rawCommand('SESSION.OPEN', session_id(), $user);
    $c->rawCommand('JOIN', session_id(), PRESENCE_GOODS);
}

/** The users on `goods` right now, from comet (sorted, unique). */
function online_users(): array
{
    $c = comet();
    $flat = $c ? $c->rawCommand('PRESENCE', GOODS) : [];
    $users = [];
    for ($i = 1; is_array($flat) && $i < count($flat); $i += 2) {
        if ($flat[$i] !== '') {
            $users[$flat[$i]] = true;
        }
    }
    $users = array_keys($users);
    sort($users);
    return $users;
}

function publish(string $channel, array $message): int
{
    $c = comet();
    return $c ? (int)$c->publish($channel, json_encode($message, JSON_UNESCAPED_UNICODE)) : 0;
}

/** Answers JSON and ends the request. */
function json_out(array $data, int $status = 200): never
{
    http_response_code($status);
    header('Content-Type: application/json; charset=utf-8');
    header('Cache-Control: no-store');
    exit(json_encode($data, JSON_UNESCAPED_UNICODE));
}

/** For form posts: fetch() asks for JSON, a plain form gets a redirect back to the page. */
function wants_json(): bool
{
    return str_contains($_SERVER['HTTP_ACCEPT'] ?? '', 'application/json');
}

function require_post(): void
{
    if ($_SERVER['REQUEST_METHOD'] !== 'POST') {
        header('Allow: POST');
        json_out(['error' => 'POST only'], 405);
    }
}

function require_user(): string
{
    $user = current_user();
    if ($user === null) {
        json_out(['error' => 'not logged in'], 401);
    }
    return $user;
}
