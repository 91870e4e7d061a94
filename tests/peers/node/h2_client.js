// A WebSocket client over HTTP/2 (RFC 8441) for the gateway's tests, on
// Node's own `http2`: one TLS connection (ALPN h2), N extended CONNECT
// streams (`:protocol = websocket`) at once, each echoing text and binary
// messages of the given sizes with `ws` framing, checking every reply, then
// closing with a code and reason. `--get PATH` also sends a plain GET on the
// same connection. Prints one JSON line.
//
//   node h2_client.js https://HOST:PORT/PATH --ca FILE [--servername NAME]
//        [--streams N] [--sizes 0,1,65536] [--protocol P[,P2]] [--origin O]
//        [--header 'Name: value']... [--close 4001:reason] [--get PATH]
//        [--hold]
//
// --hold: once every stream has echoed its messages (or been refused),
// prints "OPEN <n>" and waits for a line on stdin; then each open stream
// echoes one more message and closes (for hot upgrades and drains, with the
// streams open).
// A refused stream reports {"status": <status>, "body": ...} in its place.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const http2 = require('http2');
const WebSocket = require('ws');

const args = process.argv.slice(2);
const url = new URL(args[0]);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const sizes = opt('--sizes', '0,1,125,126,65535,65536').split(',').map(Number);
const streams = Number(opt('--streams', '1'));
const protocol = opt('--protocol', null);
const origin = opt('--origin', null);
const getPath = opt('--get', null);
const hold = args.includes('--hold');
// Resolves once stdin gives a line (--hold).
let goOn = null;
const wentOn = new Promise((resolve) => {
  goOn = resolve;
});
let waiting = 0;
const heldOne = () => {
  waiting += 1;
  if (waiting === streams) {
    console.log(`OPEN ${streams}`);
    process.stdin.once('data', () => goOn());
  }
};
const [closeCode, closeReason] = opt('--close', '4001:h2 done').split(':');
const extra = {};
args.forEach((a, i) => {
  if (a !== '--header') return;
  const h = args[i + 1];
  const at = h.indexOf(':');
  extra[h.slice(0, at).trim().toLowerCase()] = h.slice(at + 1).trim();
});

const fail = (why) => {
  console.log(JSON.stringify({ error: String(why) }));
  process.exit(1);
};
setTimeout(() => fail('timed out'), 60000).unref();

const session = http2.connect(url.origin, {
  ca: fs.readFileSync(opt('--ca')),
  servername: opt('--servername', url.hostname),
});
session.on('error', fail);
const out = { alpn: null, connect_protocol: null, streams: [] };
// The server's GOAWAY (a drain, a hot upgrade): its error code.
session.on('goaway', (code) => {
  out.goaway = code;
});

// Reads a whole response body of a stream.
const body = (stream) =>
  new Promise((resolve) => {
    const parts = [];
    stream.on('data', (d) => parts.push(d));
    stream.on('end', () => resolve(Buffer.concat(parts).toString()));
    stream.on('error', () => resolve(Buffer.concat(parts).toString()));
  });

const plainGet = () =>
  new Promise((resolve) => {
    const req = session.request({ ':method': 'GET', ':path': getPath });
    req.on('response', async (h) => resolve({ status: h[':status'], body: await body(req) }));
    req.on('error', (e) => resolve({ error: String(e) }));
    req.end();
  });

// One WebSocket on one stream: echo every message, then close.
const websocket = (n) =>
  new Promise((resolve) => {
    const headers = {
      ':method': 'CONNECT',
      ':protocol': 'websocket',
      ':scheme': 'https',
      ':path': url.pathname + url.search,
      ':authority': url.host,
      'sec-websocket-version': '13',
      ...extra,
    };
    if (protocol) headers['sec-websocket-protocol'] = protocol;
    if (origin) headers.origin = origin;
    const req = session.request(headers, { endStream: false });
    const result = { stream: n, echoed: 0, bytes: 0 };
    req.on('error', (e) => resolve({ ...result, error: String(e) }));
    req.on('response', async (h) => {
      result.status = h[':status'];
      if (result.status !== 200) {
        result.body = await body(req);
        // A refused stream is settled: --hold waits for the others.
        if (hold) heldOne();
        return resolve(result);
      }
      result.protocol = h['sec-websocket-protocol'] || '';
      // `ws` wraps a stream as a WebSocket only in its server role; the
      // client role differs in masking what it sends and in expecting
      // unmasked frames, which `_isServer` decides.
      const ws = new WebSocket(null, undefined, { autoPong: true });
      ws._isServer = false;
      ws.setSocket(req, Buffer.alloc(0), { maxPayload: 64 * 1024 * 1024 });
      const queue = [];
      for (const size of sizes) {
        queue.push({ binary: false, data: `${n}:` + 'x'.repeat(size) });
        queue.push({ binary: true, data: crypto.randomBytes(size) });
      }
      let current = null;
      let held = !hold;
      const next = () => {
        current = queue.shift();
        if (!current && !held) {
          held = true;
          heldOne();
          return wentOn.then(() => {
            queue.push({ binary: false, data: `${n}: again` });
            next();
          });
        }
        if (!current) return ws.close(Number(closeCode), closeReason);
        ws.send(current.data, { binary: current.binary });
      };
      ws.on('error', (e) => resolve({ ...result, error: String(e) }));
      ws.on('pong', (data) => {
        result.pong = data.toString();
        next();
      });
      ws.on('message', (data, isBinary) => {
        const want = current.binary ? current.data : Buffer.from(current.data);
        if (isBinary !== current.binary || !Buffer.from(data).equals(want)) {
          return resolve({ ...result, error: `echo mismatch at ${want.length} bytes` });
        }
        result.echoed += 1;
        result.bytes += want.length;
        next();
      });
      ws.on('close', (code, reason) => {
        result.close_code = code;
        result.close_reason = reason.toString();
        resolve(result);
      });
      ws.ping(`h2-ping-${n}`);
    });
  });

session.on('remoteSettings', async (settings) => {
  if (out.connect_protocol !== null) return;
  out.alpn = session.alpnProtocol;
  out.connect_protocol = Boolean(settings.enableConnectProtocol);
  out.max_streams = settings.maxConcurrentStreams;
  if (!out.connect_protocol) {
    console.log(JSON.stringify(out));
    process.exit(0);
  }
  if (getPath) out.get = await plainGet();
  out.streams = await Promise.all(Array.from({ length: streams }, (_, n) => websocket(n)));
  const finish = () => {
    console.log(JSON.stringify(out));
    process.exit(0);
  };
  // A connection the server has ended (GOAWAY, then its close) is closed already.
  if (session.closed || session.destroyed) finish();
  else session.close(finish);
});
