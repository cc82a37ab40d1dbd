<?php
/**
 * Publishing with predis, the pure-PHP Redis client (no extension to install: Debian's
 * php-predis, or `composer require predis/predis` and vendor/autoload.php instead of the two
 * lines below). Commands predis does not know are sent with executeRaw().
 *
 *   php publish-predis.php [--host=127.0.0.1 --port=8101 --token=...] CHANNEL [MESSAGE]
 *
 * Prints the PUBLISH reply.
 */

declare(strict_types=1);
require __DIR__ . '/comet.php';
require 'Predis/Autoloader.php'; // Debian's php-predis, in /usr/share/php (on the include path)
Predis\Autoloader::register();

$args = comet_args();
if (count($args) < 1 || count($args) > 2) {
    fwrite(STDERR, "usage: php publish-predis.php [--host= --port= --token=] CHANNEL [MESSAGE]\n");
    exit(2);
}
$channel = $args[0];
$message = $args[1] ?? json_encode(['price' => 42, 'at' => time()]);

$s = comet_settings();
$client = new Predis\Client([
    'scheme' => 'tcp',
    'host' => $s['host'],
    'port' => $s['port'],
    'password' => $s['token'], // predis sends AUTH <password> when it connects
    'timeout' => 2.0,
]);
try {
    echo $client->publish($channel, $message), "\n";
    // Any other comet command, e.g. how many sessions are online:
    // $client->executeRaw(['ONLINE', 'COUNT']);
} catch (Predis\PredisException $e) {
    fwrite(STDERR, "comet: " . $e->getMessage() . "\n");
    exit(1);
}
