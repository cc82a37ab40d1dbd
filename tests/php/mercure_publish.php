<?php
// Publishes two updates through Symfony's Mercure client (Debian's php-symfony-mercure), as a
// Symfony app does: a public one with id, type and retry, then a private one. Prints the ids the
// hub answered, one per line. Usage: php mercure_publish.php HUB_URL JWT
require_once '/usr/share/php/Symfony/Component/Mercure/autoload.php';

use Symfony\Component\Mercure\Hub;
use Symfony\Component\Mercure\Jwt\StaticTokenProvider;
use Symfony\Component\Mercure\Update;

[, $url, $jwt] = $argv;
$hub = new Hub($url, new StaticTokenProvider($jwt));
echo $hub->publish(new Update('https://example.com/books/1', '{"title":"Dune"}', false, 'book-1', 'update', 3000)), "\n";
echo $hub->publish(new Update(['https://example.com/secrets/1'], 'private', true, 'secret-1')), "\n";
