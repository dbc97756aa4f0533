// The PM2 side of bench/cluster/run: the smallest Node server that answers like cozy's /healthz.
//
// Plain by default: no signal handler, Node's default http.Server settings (keep-alive on, 5 s idle
// keep-alive timeout), which is what an app gets from `pm2 start server.js -i N` when it does nothing
// special. With BENCH_GRACEFUL=1 it adds the shutdown handler PM2's documentation recommends
// ("Graceful Stop": on SIGINT, close the server and exit once it is closed), to show what PM2 does when
// the application does its share of the work.
'use strict';
const http = require('http');

const body = JSON.stringify({ status: 'ok' });
const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/healthz') {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  } else {
    res.writeHead(404, { 'content-length': 0 });
    res.end();
  }
});

if (process.env.BENCH_GRACEFUL === '1') {
  process.on('SIGINT', () => {
    // Stops accepting; since Node 19 close() also closes idle keep-alive connections, and busy ones
    // are closed after their response. Exit once every connection is gone.
    server.close(() => process.exit(0));
  });
}

server.listen(Number(process.env.PORT || 3000), '127.0.0.1');
