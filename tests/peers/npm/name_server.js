'use strict';

// An endpoint for the routing tests: answers every HTTP/1.1 or HTTP/2 (h2c, prior knowledge)
// request with its own name, and counts what it received.
//
//   node name_server.js --name v1 --port 8080 --proto http1|h2c --stats-port 9901
//
// Needs no npm package. Listens on 0.0.0.0:PORT (run it inside a test netns). A second listener
// on 127.0.0.1:STATS_PORT answers `GET /` with `{"name","requests","connections","by_header"}`:
// requests and accepted connections so far, and how many requests carried each `x-canary` value.
// Prints `listening 0.0.0.0:PORT` when both are bound and `accepted peer=IP:PORT` per connection.

const http = require('http');
const http2 = require('http2');

function parseArgs(argv) {
  const args = { name: 'server', port: 8080, proto: 'http1', statsPort: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const [ key, value ] = [ argv[i], argv[i + 1] ];
    if (value === undefined) throw new Error(`${key} needs a value`);
    if (key === '--name') args.name = value;
    else if (key === '--port') args.port = Number(value);
    else if (key === '--proto') args.proto = value;
    else if (key === '--stats-port') args.statsPort = Number(value);
    else throw new Error(`unknown argument ${key}`);
  }
  if (![ 'http1', 'h2c' ].includes(args.proto)) throw new Error(`--proto http1|h2c, not ${args.proto}`);
  return args;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const stats = { name: args.name, requests: 0, connections: 0, by_header: {} };
  const body = Buffer.from(args.name);

  const count = headers => {
    stats.requests += 1;
    const canary = headers['x-canary'];
    if (canary !== undefined) stats.by_header[canary] = (stats.by_header[canary] || 0) + 1;
  };
  const onConnection = socket => {
    stats.connections += 1;
    console.log(`accepted peer=${socket.remoteAddress}:${socket.remotePort}`);
  };

  let server;
  if (args.proto === 'http1') {
    server = http.createServer({ keepAliveTimeout: 60000 }, (req, res) => {
      count(req.headers);
      req.resume();
      req.on('end', () => {
        res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
        res.end(body);
      });
    });
    server.headersTimeout = 60000;
  } else {
    server = http2.createServer({ settings: { maxConcurrentStreams: 1000 } });
    server.on('stream', (stream, headers) => {
      count(headers);
      stream.on('error', () => {});
      stream.resume();
      stream.on('end', () => {
        stream.respond({ ':status': 200, 'content-type': 'text/plain', 'content-length': body.length });
        stream.end(body);
      });
    });
    server.on('sessionError', () => {});
  }
  server.on('connection', onConnection);

  const statsServer = http.createServer((req, res) => {
    const text = JSON.stringify(stats);
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  });

  server.listen(args.port, '0.0.0.0', () => {
    statsServer.listen(args.statsPort, '127.0.0.1', () => {
      console.log(`listening 0.0.0.0:${server.address().port} stats=127.0.0.1:${statsServer.address().port}`);
    });
  });
  const stop = () => process.exit(0);
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

try {
  main();
} catch (err) {
  console.error(`name_server: ${err.message}`);
  process.exit(64);
}
