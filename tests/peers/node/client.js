// A WebSocket client for the gateway's tests: echoes text and binary
// messages of the given sizes through URL, checks each reply, then closes
// with a code and reason. Prints one JSON line with what was negotiated.
//
//   node client.js URL [--sizes 0,1,65536] [--protocol P[,P2]] [--deflate]
//                      [--origin O] [--close 4001:reason] [--header 'Name: value']...
//                      [--ca FILE] [--servername NAME]   (wss://)
//
// A refused upgrade prints {"error": "HTTP <status>", "www_authenticate": ...}.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const WebSocket = require('ws');

const args = process.argv.slice(2);
const url = args[0];
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const sizes = opt('--sizes', '0,1,125,126,65535,65536').split(',').map(Number);
const protocol = opt('--protocol', null);
const headers = {};
args.forEach((a, i) => {
  if (a !== '--header') return;
  const h = args[i + 1];
  const at = h.indexOf(':');
  headers[h.slice(0, at).trim()] = h.slice(at + 1).trim();
});
const [closeCode, closeReason] = opt('--close', '4001:node done').split(':');
const options = { perMessageDeflate: args.includes('--deflate'), maxPayload: 64 * 1024 * 1024 };
if (opt('--origin', null)) options.origin = opt('--origin', null);
if (Object.keys(headers).length) options.headers = headers;
if (opt('--ca', null)) options.ca = fs.readFileSync(opt('--ca', null));
if (opt('--servername', null)) options.servername = opt('--servername', null);

const ws = new WebSocket(url, protocol ? protocol.split(',') : [], options);
const out = { echoed: 0, bytes: 0 };
const fail = (why) => {
  console.log(JSON.stringify({ error: why }));
  process.exit(1);
};
setTimeout(() => fail('timed out'), 60000).unref();

const queue = [];
for (const n of sizes) {
  queue.push({ binary: false, data: 'x'.repeat(n) });
  queue.push({ binary: true, data: crypto.randomBytes(n) });
}
let current = null;
const next = () => {
  current = queue.shift();
  if (!current) return ws.close(Number(closeCode), closeReason);
  ws.send(current.data, { binary: current.binary });
};
ws.on('unexpected-response', (req, res) => {
  console.log(JSON.stringify({ error: `HTTP ${res.statusCode}`, www_authenticate: res.headers['www-authenticate'] || null }));
  process.exit(1);
});
ws.on('error', (e) => fail(String(e)));
ws.on('open', () => {
  out.protocol = ws.protocol;
  out.extensions = ws.extensions;
  ws.ping('node-ping');
});
ws.on('pong', (data) => {
  out.pong = data.toString();
  next();
});
ws.on('message', (data, isBinary) => {
  const want = current.binary ? current.data : Buffer.from(current.data);
  if (isBinary !== current.binary || !Buffer.from(data).equals(want)) fail(`echo mismatch at ${want.length} bytes`);
  out.echoed += 1;
  out.bytes += want.length;
  next();
});
ws.on('close', (code, reason) => {
  out.close_code = code;
  out.close_reason = reason.toString();
  console.log(JSON.stringify(out));
  process.exit(0);
});
