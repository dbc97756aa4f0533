// Prints PM2's process list as one JSON line every N ms (argv[2], default 10): [[pm_id, pid, status], ...].
//
// This is what `pm2 jlist` asks the daemon, through PM2's own client API, without starting a Node CLI
// for every sample (that alone takes a few hundred milliseconds, far too coarse to time a restart).
// bench.py timestamps each line when it reads it. PM2_HOME selects the daemon.
'use strict';
const pm2 = require('pm2');
const interval = Number(process.argv[2] || 10);

pm2.connect((err) => {
  if (err) {
    console.error(err);
    process.exit(2);
  }
  const tick = () => {
    pm2.list((e, list) => {
      if (!e) {
        const rows = list.map((p) => [p.pm_id, p.pid || null, p.pm2_env.status]);
        process.stdout.write(JSON.stringify(rows) + '\n');
      }
      setTimeout(tick, interval);
    });
  };
  tick();
});

// bench.py closes our stdin when it is done with us.
process.stdin.on('end', () => {
  pm2.disconnect();
  process.exit(0);
});
process.stdin.resume();
