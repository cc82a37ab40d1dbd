<?php
/**
 * The auction page. Anonymous visitors get the login form; a logged-in visitor gets the item,
 * its price (live: channel `goods`), a bid form, who is online (live: `presence:goods`, joined
 * onto the private stream), and private messages (live: `@me`). The live parts are app.js.
 */

declare(strict_types=1);
require __DIR__ . '/lib.php';

$user = current_user();
$h = fn ($s): string => htmlspecialchars((string)$s, ENT_QUOTES);
if ($user !== null) {
    open_stream($user);
    $auction = db()->query('SELECT price, bidder FROM auction WHERE id = 1')->fetch();
    $online = online_users();
}
header('Cache-Control: no-store');
?><!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Auction<?= $user !== null ? ' · ' . $h($user) : '' ?></title>
<link rel="stylesheet" href="/style.css">
</head>
<body>
<header>
  <h1>site.com auction</h1>
  <?php if ($user !== null): ?>
  <form id="logout-form" method="post" action="/logout.php">
    Signed in as <strong id="me"><?= $h($user) ?></strong>
    <button id="logout" type="submit">Log out</button>
  </form>
  <?php endif ?>
</header>

<?php if ($user === null): ?>
<main class="login">
  <form id="login-form" method="post" action="/login.php">
    <label>Your name <input id="user" name="user" required pattern="[A-Za-z0-9_.\-]{1,24}" autofocus></label>
    <button id="login" type="submit">Log in</button>
  </form>
  <p class="hint">Open a second browser (or a private window) and log in as someone else: bids,
  private messages and who is online are pushed to every page by comet.</p>
</main>
<?php else: ?>
<main>
  <section id="auction">
    <h2><?= $h(ITEM) ?></h2>
    <p class="price">Current price <span id="price"><?= (int)$auction['price'] ?></span> €
      <span id="bidder-line"<?= $auction['bidder'] === '' ? ' hidden' : '' ?>>by <strong id="bidder"><?= $h($auction['bidder']) ?></strong></span></p>
    <form id="bid-form" method="post" action="/bid.php">
      <input id="amount" name="amount" type="number" min="1" step="1" value="<?= (int)$auction['price'] + 10 ?>" required>
      <button id="bid" type="submit">Bid</button>
      <span id="bid-result" class="result"></span>
    </form>
    <h3>Bids</h3>
    <ol id="bids" reversed></ol>
  </section>

  <aside>
    <section>
      <h2>Online <span id="online-count"><?= count($online) ?></span></h2>
      <ul id="online">
        <?php foreach ($online as $u): ?><li data-user="<?= $h($u) ?>"><?= $h($u) ?></li><?php endforeach ?>
      </ul>
    </section>
    <section>
      <h2>Private messages</h2>
      <form id="message-form" method="post" action="/message.php">
        <input id="to" name="to" placeholder="to" list="online-names" required>
        <datalist id="online-names"></datalist>
        <input id="text" name="text" placeholder="message" required>
        <button id="send" type="submit">Send</button>
        <span id="send-result" class="result"></span>
      </form>
      <ul id="inbox"></ul>
    </section>
  </aside>
</main>
<p id="status" class="status" data-state="starting">connecting…</p>
<script>
  window.SITE = <?= json_encode([
      'user' => $user,
      'login' => $_SESSION['login'] ?? '',
      'push' => '/push',
  ], JSON_HEX_TAG | JSON_HEX_AMP) ?>;
</script>
<script src="/push/comet.js"></script>
<script src="/app.js"></script>
<?php endif ?>
</body>
</html>
