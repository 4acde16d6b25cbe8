'use strict';

// A SOFA Bolt or Dubbo 2 load client for the routing tests: the real sofa-rpc-node RpcClient in
// direct mode (no registry) calling `whoami` on rpc_server.js's interface over ONE connection.
// Bolt requests carry their properties in the Bolt header map as SOFARPC's Java client does
// (see javaStyleBoltHeaders).
//
//   node rpc_load.js --protocol bolt|dubbo --connect HOST:PORT --requests N --concurrency C
//                    [--header k=v]... [--seconds-limit S] [--progress-every K] [--stock-bolt]
//   node rpc_load.js --protocol bolt|dubbo --connect HOST:PORT --rate R --duration S
//                    [--stop-file F] [--seconds-limit S] [--progress-every K]
//
// At most C calls are in flight at once. `--header` adds a Bolt request header / Dubbo
// attachment to every call. Prints one JSON line at the end:
// `{"answered","errors","by_server":{"v1":..,"v2":..},"connections","first_error","elapsed_ms"}`
// where `connections` counts the TCP connects this process made. With `--progress-every K`
// it also prints `{"progress":n,"by_server":{..}}` every K answers. Exits 0 only when every call
// was answered within the time limit (default 60 s).
//
// Constant-rate mode (`--rate R`, calls per second): calls `echo` with a token unique to the
// call, R per second on a fixed schedule whatever is in flight (so a stall shows up as calls
// piling up, not as a slower client), for `--duration S` seconds or until the file
// `--stop-file F` exists, then waits for the calls in flight (each times out after 10 s).
// Every answer must be its own call's token: one that is not counts in `mismatched` (and as an
// error). The summary adds `"issued","mismatched","max_in_flight"`. `--seconds-limit` still
// bounds the whole run (default: duration + 30 s).

const net = require('net');
const { RpcClient } = require('sofa-rpc-node').client;

const INTERFACE = 'com.sockmesh.test.WhoService';
const VERSION = '1.0';

const quiet = { info() {}, warn() {}, debug() {}, error() {} };

// sofa-bolt-node writes the request properties (and the method) into the Bolt header map only
// for protobuf; with hessian they travel in the body alone. SOFARPC's Java client writes
// `service`, `sofa_head_method_name`, `sofa_head_target_service`, `sofa_head_target_app` and the
// flattened request properties into the header map for every serialization, and that map is
// what a mesh routes on: make this client do the same (the server skips the map for hessian).
function javaStyleBoltHeaders() {
  const RpcRequestCommand = require('sofa-bolt-node/lib/protocol/rpc_req_cmd');
  const SimpleMapSerializer = require('sofa-bolt-node/lib/simple_map_serializer');
  const boltUtils = require('sofa-bolt-node/lib/utils');
  RpcRequestCommand.prototype.serializeHeader = function(byteBuffer) {
    const signature = this.obj.serverSignature;
    const headers = {
      service: signature,
      sofa_head_method_name: this.obj.methodName,
      sofa_head_target_app: this.obj.targetAppName || '',
      sofa_head_target_service: signature,
    };
    if (this.obj.requestProps) boltUtils.flatCopyTo('', this.obj.requestProps, headers);
    byteBuffer.put(SimpleMapSerializer.encode(headers));
  };
}

// Count every TCP connect this client makes (the RpcClient pools connections internally).
let connects = 0;
const originalConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function(...args) {
  connects += 1;
  return originalConnect.apply(this, args);
};

function parseArgs(argv) {
  const args = {
    protocol: 'bolt', connect: null, requests: 1, concurrency: 1, headers: {},
    secondsLimit: 0, progressEvery: 0, rate: 0, duration: 0, stopFile: null,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [ key, value ] = [ argv[i], argv[i + 1] ];
    // The stock client: request properties and the method stay in the hessian body.
    if (key === '--stock-bolt') { args.stockBolt = true; i -= 1; continue; }
    if (value === undefined) throw new Error(`${key} needs a value`);
    if (key === '--protocol') args.protocol = value;
    else if (key === '--connect') args.connect = value;
    else if (key === '--requests') args.requests = Number(value);
    else if (key === '--concurrency') args.concurrency = Number(value);
    else if (key === '--seconds-limit') args.secondsLimit = Number(value);
    else if (key === '--progress-every') args.progressEvery = Number(value);
    else if (key === '--rate') args.rate = Number(value);
    else if (key === '--duration') args.duration = Number(value);
    else if (key === '--stop-file') args.stopFile = value;
    else if (key === '--header') {
      const eq = value.indexOf('=');
      if (eq <= 0) throw new Error(`--header k=v, not ${value}`);
      args.headers[value.slice(0, eq)] = value.slice(eq + 1);
    } else throw new Error(`unknown argument ${key}`);
  }
  if (!args.connect) throw new Error('--connect HOST:PORT is required');
  if (args.rate !== 0 || args.duration !== 0) {
    if (!(args.rate > 0 && args.duration > 0)) throw new Error('--rate and --duration must both be positive');
    if (args.secondsLimit === 0) args.secondsLimit = args.duration + 30;
  } else if (args.secondsLimit === 0) args.secondsLimit = 60;
  if (!(args.requests > 0 && args.concurrency > 0 && args.secondsLimit > 0)) {
    throw new Error('--requests, --concurrency and --seconds-limit must be positive');
  }
  return args;
}

function protocolModule(name, stock) {
  if (name === 'bolt') {
    if (!stock) javaStyleBoltHeaders();
    return require('sofa-bolt-node');
  }
  if (name === 'dubbo') return require('dubbo-remoting');
  throw new Error(`--protocol bolt|dubbo, not ${name}`);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const start = Date.now();
  const result = { answered: 0, errors: 0, by_server: {}, connections: 0, first_error: null, elapsed_ms: 0 };
  const finish = code => {
    result.connections = connects;
    result.elapsed_ms = Date.now() - start;
    console.log(JSON.stringify(result));
    process.exit(code);
  };
  const deadline = setTimeout(() => {
    result.first_error = result.first_error || `time limit of ${args.secondsLimit} s reached`;
    finish(1);
  }, args.secondsLimit * 1000);
  deadline.unref();

  const client = new RpcClient({ logger: quiet, protocol: protocolModule(args.protocol, args.stockBolt) });
  client.on('error', err => { result.first_error = result.first_error || `client: ${err.message}`; });
  const consumer = client.createConsumer({
    interfaceName: INTERFACE,
    version: VERSION,
    serverHost: args.connect,
  });
  await consumer.ready();

  // Bolt routes on the `service` header: keep it when adding headers of our own.
  const requestProps = Object.keys(args.headers).length === 0 ? undefined :
    Object.assign({ service: `${INTERFACE}:${VERSION}` }, args.headers);
  if (args.rate > 0) {
    await constantRate(args, consumer, requestProps, result);
    finish(result.errors === 0 && result.answered === result.issued ? 0 : 1);
    return;
  }
  let issued = 0;
  const worker = async () => {
    while (issued < args.requests) {
      issued += 1;
      try {
        const name = await consumer.invoke('whoami', [], { responseTimeout: 10000, requestProps });
        result.answered += 1;
        result.by_server[name] = (result.by_server[name] || 0) + 1;
        if (args.progressEvery > 0 && result.answered % args.progressEvery === 0) {
          console.log(JSON.stringify({ progress: result.answered, by_server: result.by_server }));
        }
      } catch (err) {
        result.errors += 1;
        result.first_error = result.first_error || err.message.split('\n')[0];
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(args.concurrency, args.requests) }, worker));
  finish(result.errors === 0 && result.answered === args.requests ? 0 : 1);
}

// `--rate`: `echo` calls on a fixed schedule until the duration ends or the stop file exists.
async function constantRate(args, consumer, requestProps, result) {
  const fs = require('fs');
  Object.assign(result, { issued: 0, mismatched: 0, max_in_flight: 0 });
  const start = Date.now();
  const end = start + args.duration * 1000;
  const calls = new Set();
  let inFlight = 0;
  const call = n => {
    const token = `${process.pid}-${n}-${Math.random().toString(36).slice(2)}`;
    inFlight += 1;
    result.max_in_flight = Math.max(result.max_in_flight, inFlight);
    const p = consumer.invoke('echo', [{ $class: 'java.lang.String', $: token }],
      { responseTimeout: 10000, requestProps })
      .then(answer => {
        if (answer === token) {
          result.answered += 1;
          if (args.progressEvery > 0 && result.answered % args.progressEvery === 0) {
            console.log(JSON.stringify({ progress: result.answered, in_flight: inFlight }));
          }
        } else {
          result.mismatched += 1;
          result.errors += 1;
          result.first_error = result.first_error ||
            `call ${n} got ${JSON.stringify(answer)}, not its token ${token}`;
        }
      }, err => {
        result.errors += 1;
        result.first_error = result.first_error || `call ${n}: ${err.message.split('\n')[0]}`;
      })
      .finally(() => { inFlight -= 1; calls.delete(p); });
    calls.add(p);
  };
  for (;;) {
    const now = Date.now();
    if (now >= end || (args.stopFile && fs.existsSync(args.stopFile))) break;
    // Calls due by now on the schedule (catching up after a stall of this process).
    const due = Math.floor((now - start) * args.rate / 1000);
    while (result.issued < due) {
      result.issued += 1;
      call(result.issued);
    }
    await new Promise(resolve => setTimeout(resolve, 5));
  }
  await Promise.all([ ...calls ]);
}

main().catch(err => {
  console.error(`rpc_load: ${err.stack || err.message}`);
  process.exit(1);
});
