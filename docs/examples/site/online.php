<?php
/** GET /online.php: who is on `goods` now (the page gets updates pushed; this is for a start). */

declare(strict_types=1);
require __DIR__ . '/lib.php';

json_out(['users' => online_users()]);
