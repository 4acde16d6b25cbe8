'use strict';

// A SOFA Bolt or Dubbo 2 endpoint for the routing tests: the real sofa-rpc-node RpcServer with
// one interface whose `whoami` method answers the server's name (e.g. `v1`) and whose `echo(s)`
// answers `s` (after `--delay-ms D`, default 0: keeps calls in flight for the upgrade tests).
//
//   node rpc_server.js --protocol bolt|dubbo --name v1 --port 12200 --stats-port 9901 [--delay-ms D]
//
// RpcServer listens on every address of its network namespace: run it inside a test netns. A
// second listener on 127.0.0.1:STATS_PORT answers `GET /` with
// `{"name","requests","connections","by_header","by_colour"}` (requests served, connections
// accepted, and how many requests carried each `x-canary` / `x-mesh-colour` request property or
// attachment value; `none` for no colour). Prints
// `listening 0.0.0.0:PORT` when both are bound and `accepted peer=IP:PORT` per connection.

const http = require('http');
const { RpcServer } = require('sofa-rpc-node').server;

const INTERFACE = 'com.sockmesh.test.WhoService';
const VERSION = '1.0';

const quiet = { info() {}, warn() {}, debug() {}, error() {} };

function parseArgs(argv) {
  const args = { protocol: 'bolt', name: 'server', port: 12200, statsPort: 0, delayMs: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const [ key, value ] = [ argv[i], argv[i + 1] ];
    if (value === undefined) throw new Error(`${key} needs a value`);
    if (key === '--protocol') args.protocol = value;
    else if (key === '--name') args.name = value;
    else if (key === '--port') args.port = Number(value);
    else if (key === '--stats-port') args.statsPort = Number(value);
    else if (key === '--delay-ms') args.delayMs = Number(value);
    else throw new Error(`unknown argument ${key}`);
  }
  return args;
}

function protocolModule(name) {
  if (name === 'bolt') return require('sofa-bolt-node');
  if (name === 'dubbo') return require('dubbo-remoting');
  throw new Error(`--protocol bolt|dubbo, not ${name}`);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const stats = { name: args.name, requests: 0, connections: 0, by_header: {}, by_colour: {} };
  const server = new RpcServer({
    logger: quiet,
    protocol: protocolModule(args.protocol),
    port: args.port,
    // A graceful-exit helper inside RpcServer kills the process on an uncaught error; a test
    // endpoint must rather keep serving and let the test see the error count.
    killTimeout: 1000,
  });
  server.addService({ interfaceName: INTERFACE, version: VERSION }, {
    async whoami() {
      stats.requests += 1;
      return args.name;
    },
    async echo(s) {
      stats.requests += 1;
      if (args.delayMs > 0) await new Promise(resolve => setTimeout(resolve, args.delayMs));
      return s;
    },
  });
  server.on('request', ({ req }) => {
    const props = (req && req.data && req.data.requestProps) || {};
    const canary = props['x-canary'];
    if (canary !== undefined) stats.by_header[canary] = (stats.by_header[canary] || 0) + 1;
    const colour = props['x-mesh-colour'] || 'none';
    stats.by_colour[colour] = (stats.by_colour[colour] || 0) + 1;
  });
  server.on('error', err => console.error(`rpc server error: ${err.message}`));
  await server.start();
  await server.ready();
  for (const listener of server._servers) {
    listener.on('connection', socket => {
      stats.connections += 1;
      console.log(`accepted peer=${socket.remoteAddress}:${socket.remotePort}`);
    });
  }
  const statsServer = http.createServer((req, res) => {
    const text = JSON.stringify(stats);
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  });
  await new Promise(resolve => statsServer.listen(args.statsPort, '127.0.0.1', resolve));
  const port = server._servers[0].address().port;
  console.log(`listening 0.0.0.0:${port} stats=127.0.0.1:${statsServer.address().port}`);
}

process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
main().catch(err => {
  console.error(`rpc_server: ${err.stack || err.message}`);
  process.exit(1);
});
