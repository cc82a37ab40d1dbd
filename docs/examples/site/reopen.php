<?php
/**
 * POST /reopen.php: opens the private stream again for a visitor who is still logged in.
 * comet keeps open sessions in memory: after a restart of comet a page's `@me` poll gets 403
 * (as after a logout), and the page asks here whether the login is still good before it gives
 * up. 401 when it is not.
 */

declare(strict_types=1);
require __DIR__ . '/lib.php';

require_post();
$user = require_user();
open_stream($user);
// The page's goods poll may have come back before this: comet then saw the session online
// without a user name, and SESSION.OPEN naming it raises no presence event. So publish the
// list as it is now (as the presence worker does), for every page.
publish(PRESENCE_GOODS, ['channel' => GOODS, 'users' => online_users(), 'at' => time()]);
json_out(['user' => $user, 'open' => comet() !== null]);
