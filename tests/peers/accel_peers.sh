#!/bin/sh
# Real clients through the mesh, run inside the client pod: curl, wrk, Node.js http, Python
# asyncio (with idle keep-alive connections that wake up later), a large upload and download.
# usage: accel_peers.sh HOST NODE_PORT NGINX_PORT(0: none) PEERS_DIR
# Prints one "PASS name ..." or "FAIL name ..." line per client; exits 1 if any failed.
set -u
host=$1; nport=$2; xport=$3; peers=$4
fails=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; fails=$((fails + 1)); }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# curl: 20 separate connections
n=0; for i in $(seq 20); do
  [ "$(curl -sS --max-time 10 "http://$host:$nport/")" = ok ] && n=$((n + 1))
done
[ $n = 20 ] && pass curl-20-gets || fail curl-20-gets "$n/20"

# curl: 64 MiB download and upload
got=$(curl -sS --max-time 60 -o /dev/null -w '%{size_download}' "http://$host:$nport/big?n=67108864")
[ "$got" = 67108864 ] && pass curl-download-64MiB || fail curl-download-64MiB "got $got"
head -c 67108864 /dev/zero > "$tmp/up"
got=$(curl -sS --max-time 60 --data-binary @"$tmp/up" "http://$host:$nport/")
[ "$got" = got=67108864 ] && pass curl-upload-64MiB || fail curl-upload-64MiB "$got"

# wrk: 3 s, 16 keep-alive connections
out=$(wrk -t1 -c16 -d3s --timeout 5s -s "$peers/wrk_count.lua" "http://$host:$nport/" | tail -1)
case "$out" in
  *'"non_2xx":0,"connect":0,"read":0,"write":0,"timeout":0'*) pass wrk "$out" ;;
  *) fail wrk "$out" ;;
esac

# Node.js http client: 300 requests over a keep-alive agent (8 sockets)
out=$(node -e '
const http = require("http");
const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });
let ok = 0, bad = 0, left = 300;
const one = () => new Promise((res) => {
  http.get({ host: process.argv[1], port: +process.argv[2], path: "/", agent }, (r) => {
    let b = ""; r.on("data", (d) => (b += d)); r.on("end", () => { b === "ok" ? ok++ : bad++; res(); });
  }).on("error", () => { bad++; res(); });
});
(async () => {
  const workers = Array.from({ length: 8 }, async () => { while (left-- > 0) await one(); });
  await Promise.all(workers);
  console.log(JSON.stringify({ ok, bad }));
  agent.destroy();
})();' "$host" "$nport")
[ "$out" = '{"ok":300,"bad":0}' ] && pass node-http "$out" || fail node-http "$out"

# Python asyncio: 32 keep-alive connections, a request each, 3 s idle, another request each
out=$(python3 - "$host" "$nport" <<'PY'
import asyncio, sys, json
host, port = sys.argv[1], int(sys.argv[2])
async def req(r, w):
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    return await asyncio.wait_for(r.readexactly(n), 10)
async def conn():
    r, w = await asyncio.open_connection(host, port)
    a = await req(r, w)
    await asyncio.sleep(3)
    b = await req(r, w)
    w.close()
    return a == b"ok" and b == b"ok"
async def main():
    res = await asyncio.gather(*(conn() for _ in range(32)), return_exceptions=True)
    print(json.dumps({"ok": sum(1 for x in res if x is True), "of": len(res)}))
asyncio.run(main())
PY
)
[ "$out" = '{"ok": 32, "of": 32}' ] && pass python-asyncio-idle-keepalive "$out" || fail python-asyncio-idle-keepalive "$out"

if [ "$xport" != 0 ]; then
  # nginx as the server: static files, curl and wrk
  got=$(curl -sS --max-time 30 -o /dev/null -w '%{size_download}' "http://$host:$xport/big")
  [ "$got" = 33554432 ] && pass nginx-download-32MiB || fail nginx-download-32MiB "got $got"
  out=$(wrk -t1 -c16 -d3s --timeout 5s -s "$peers/wrk_count.lua" "http://$host:$xport/small" | tail -1)
  case "$out" in
    *'"non_2xx":0,"connect":0,"read":0,"write":0,"timeout":0'*) pass nginx-wrk "$out" ;;
    *) fail nginx-wrk "$out" ;;
  esac
fi
[ $fails = 0 ]
