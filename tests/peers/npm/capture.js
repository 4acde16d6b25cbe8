'use strict';

// Captures the raw bytes that the real SOFA Bolt (sofa-rpc-node + sofa-bolt-node) and Dubbo 2
// (sofa-rpc-node + dubbo-remoting) clients and servers put on the wire, for the byte-exact codec
// tests in mesh-userspace/src/protocol.
//
//   node capture.js OUT_DIR
//
// For each scenario it starts an RpcServer, a recording TCP relay in front of it, and an RpcClient
// in direct mode (serverHost = the relay, no registry). The relay writes what the client sent to
// `<scenario>.c2s.bin` and what the server answered to `<scenario>.s2c.bin`. Everything listens on
// 127.0.0.1 only (RpcServer itself calls `listen(port)`, i.e. all addresses: `listen` is wrapped
// below so that it binds to loopback), on ports the kernel picks.

const fs = require('fs');
const net = require('net');
const path = require('path');

const LOOPBACK = '127.0.0.1';

// RpcServer calls `server.listen(port, cb)`: pin every such call to loopback.
const originalListen = net.Server.prototype.listen;
net.Server.prototype.listen = function(...args) {
  if (typeof args[0] === 'number' && (args.length === 1 || typeof args[1] === 'function')) {
    args.splice(1, 0, LOOPBACK);
  }
  return originalListen.apply(this, args);
};

const java = require('js-to-java');
const bolt = require('sofa-bolt-node');
const dubbo = require('dubbo-remoting');
const { RpcServer } = require('sofa-rpc-node').server;
const { RpcClient } = require('sofa-rpc-node').client;

const quiet = {
  info() {},
  warn() {},
  debug() {},
  error() {},
};

// sofa-bolt-node's encoder speaks Bolt v1 unless told otherwise; the server answers in the
// protocol version of the request. This wrapper makes the real client encode Bolt v2 (bv=2)
// with the CRC32 trailer switched on.
const boltV2 = Object.assign({}, bolt, {
  encoder(options) {
    const encoder = bolt.encoder(options);
    encoder.protocolType = 'bolt2';
    encoder.boltVersion = 2;
    encoder.crcEnable = true;
    return encoder;
  },
});

function listen(server) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    originalListen.call(server, 0, LOOPBACK, () => resolve(server.address().port));
  });
}

// A relay that records both directions.
async function startRelay(upstreamPort) {
  const c2s = [];
  const s2c = [];
  const sockets = new Set();
  const relay = net.createServer(client => {
    const upstream = net.connect(upstreamPort, LOOPBACK);
    sockets.add(client);
    sockets.add(upstream);
    client.on('data', chunk => { c2s.push(Buffer.from(chunk)); upstream.write(chunk); });
    upstream.on('data', chunk => { s2c.push(Buffer.from(chunk)); client.write(chunk); });
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  const port = await listen(relay);
  return {
    port,
    c2s: () => Buffer.concat(c2s),
    s2c: () => Buffer.concat(s2c),
    close() {
      for (const s of sockets) s.destroy();
      return new Promise(resolve => relay.close(() => resolve()));
    },
  };
}

async function scenario(outDir, name, protocol, calls) {
  const server = new RpcServer({ logger: quiet, protocol, port: 0 });
  server.addService({ interfaceName: 'com.sockmesh.test.EchoService', version: '1.0' }, {
    async echo(...args) { return `echo:${args.length}:${args[0]}`; },
    async fail() { throw new Error('boom'); },
  });
  await server.start();
  await server.ready();
  const address = server._servers[0].address();
  if (address.address !== LOOPBACK) {
    throw new Error(`RpcServer listens on ${address.address}, expected ${LOOPBACK}`);
  }

  const relay = await startRelay(address.port);
  const client = new RpcClient({ logger: quiet, protocol });
  const consumer = client.createConsumer({
    interfaceName: 'com.sockmesh.test.EchoService',
    version: '1.0',
    serverHost: `${LOOPBACK}:${relay.port}`,
  });
  await consumer.ready();

  const results = [];
  for (const [ method, args, requestProps ] of calls) {
    try {
      results.push(await consumer.invoke(method, args, { responseTimeout: 3000, requestProps }));
    } catch (err) {
      results.push(`error: ${err.message.split('\n')[0]}`);
    }
  }
  // Let the last response reach the relay's recorder.
  await new Promise(resolve => setTimeout(resolve, 100));

  fs.writeFileSync(path.join(outDir, `${name}.c2s.bin`), relay.c2s());
  fs.writeFileSync(path.join(outDir, `${name}.s2c.bin`), relay.s2c());
  console.log(`${name}: ${relay.c2s().length} bytes c2s, ${relay.s2c().length} bytes s2c, results ${JSON.stringify(results)}`);

  client.close();
  await relay.close();
  await server.close();
}

async function main() {
  const outDir = path.resolve(process.argv[2] || '.');
  fs.mkdirSync(outDir, { recursive: true });

  const props = { service: 'com.sockmesh.test.EchoService:1.0', 'x-mesh-colour': 'blue' };

  await scenario(outDir, 'bolt_v1', bolt, [
    [ 'echo', [ 'hello', 42 ], props ],
    [ 'fail', [], props ],
  ]);
  await scenario(outDir, 'bolt_v2_crc', boltV2, [
    [ 'echo', [ 'hello', 42 ], props ],
  ]);
  // Arguments of many Hessian2 kinds, so the decoder has to skip each of them to reach the
  // attachments.
  await scenario(outDir, 'dubbo', dubbo, [
    [ 'echo', [
      'hello',
      42,
      java.long(1234567890123),
      3.25,
      true,
      null,
      Buffer.from([ 1, 2, 3 ]),
      [ 1, 'two', 3 ],
      { a: 1, b: 'x' },
      java('com.sockmesh.test.Point', { x: 1, y: 2 }),
      [ java('com.sockmesh.test.Point', { x: 3, y: 4 }), java('com.sockmesh.test.Point', { x: 5, y: 6 }) ],
      new Date(Date.UTC(2026, 0, 2, 3, 4, 5)),
    ], { 'x-mesh-colour': 'blue', tenant: 'acme' } ],
    [ 'fail', [ 'x' ], {} ],
  ]);
}

main().then(() => process.exit(0), err => {
  console.error(err);
  process.exit(1);
});
