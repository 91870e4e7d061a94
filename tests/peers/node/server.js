// An app server as operators run behind the gateway: a page, a streaming
// echo and a header dump over HTTP/1.1 keep-alive, and a WebSocket echo
// (subprotocols, permessage-deflate) on the same port.
//
//   node server.js --listen HOST:PORT [--name NAME] [--greet]
//
// Prints "READY <port>" once listening (PORT may be 0).
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const listen = opt('--listen', '127.0.0.1:0');
const name = opt('--name', 'node');
const greet = args.includes('--greet');
const sep = listen.lastIndexOf(':');
const host = listen.slice(0, sep).replace(/^\[|\]$/g, '');
const port = Number(listen.slice(sep + 1));

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url.startsWith('/page')) {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(`page from ${name} at ${req.url}\n`);
  } else if (req.method === 'POST' && req.url.startsWith('/echo')) {
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    req.pipe(res);
  } else if (req.url.split('?')[0].endsWith('/headers')) {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ name, url: req.url, headers: req.headers }));
  } else {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end(`no such page on ${name}\n`);
  }
});
server.keepAliveTimeout = 30000;

const wss = new WebSocketServer({
  server,
  maxPayload: 64 * 1024 * 1024,
  perMessageDeflate: true,
  handleProtocols: (protocols) => (protocols.size ? [...protocols][0] : false),
});
wss.on('connection', (ws, req) => {
  if (greet) ws.send(`hello from ${name} at ${req.url}`);
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => {});
});

server.listen(port, host, () => {
  console.log(`READY ${server.address().port}`);
});
process.on('SIGTERM', () => process.exit(0));
