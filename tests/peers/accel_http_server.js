// HTTP/1.1 server for the accelerated-path peer test (Node.js http, keep-alive):
//   GET /            -> "ok"
//   GET /big?n=N     -> N bytes (a download)
//   POST /           -> "got=<bytes received>" (an upload)
// Prints "listening <port>" once bound.
const http = require("http");
const port = parseInt(process.argv[2], 10);
const chunk = Buffer.alloc(65536, 0x61);
http
  .createServer((req, res) => {
    if (req.method === "POST") {
      let got = 0;
      req.on("data", (d) => (got += d.length));
      req.on("end", () => res.end(`got=${got}`));
      return;
    }
    const m = /[?&]n=(\d+)/.exec(req.url);
    if (!m) return res.end("ok");
    let left = parseInt(m[1], 10);
    res.writeHead(200, { "content-length": left });
    const more = () => {
      while (left > 0) {
        const n = Math.min(left, chunk.length);
        left -= n;
        if (!res.write(n === chunk.length ? chunk : chunk.subarray(0, n))) return res.once("drain", more);
      }
      res.end();
    };
    more();
  })
  .listen(port, "0.0.0.0", () => console.log(`listening ${port}`));
