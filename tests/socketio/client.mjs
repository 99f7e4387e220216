// A real socket.io-client 4.8, driven by the Rust integration tests
// (tests/it/socketio.rs) over stdin/stdout, one JSON object per line.
//
//   node client.mjs <url> '<options JSON>'
//
// options: path, transports, auth, namespace, reconnection, reconnectionDelay
// (ms, fixed), answers
// ({event: [ack args]} answered to server calls), forceNew.
// It prints {"type": connect|disconnect|connect_error|event|call|ack|upgrade|state, ...}
// (binary values as {"$bin": "<base64>"}, and such values it is given are sent as Buffers)
// and reads {"op": emit|disconnect|close-engine|connect|state, ...}.
import { io } from 'socket.io-client';
import readline from 'node:readline';

const [url, optionsJson] = process.argv.slice(2);
const opts = JSON.parse(optionsJson || '{}');
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const socket = io(url + (opts.namespace || ''), {
  path: opts.path || '/socket.io/',
  transports: opts.transports || ['polling', 'websocket'],
  auth: opts.auth || {},
  reconnection: opts.reconnection ?? true,
  reconnectionDelay: opts.reconnectionDelay ?? 100,
  reconnectionDelayMax: opts.reconnectionDelay ?? 500,
  randomizationFactor: opts.reconnectionDelay ? 0 : 0.5,
  timeout: 5000,
  forceNew: true,
});

// Binary values travel in the JSON lines as {"$bin": "<base64>"}, both ways.
const toJson = (v) => {
  if (v instanceof ArrayBuffer) return { $bin: Buffer.from(v).toString('base64') };
  if (ArrayBuffer.isView(v)) return { $bin: Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('base64') };
  if (Array.isArray(v)) return v.map(toJson);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toJson(x)]));
  return v;
};
const fromJson = (v) => {
  if (Array.isArray(v)) return v.map(fromJson);
  if (v && typeof v === 'object') {
    if (typeof v.$bin === 'string') return Buffer.from(v.$bin, 'base64');
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, fromJson(x)]));
  }
  return v;
};

const transport = () => socket.io.engine && socket.io.engine.transport && socket.io.engine.transport.name;

socket.io.on('open', () => {
  socket.io.engine.on('upgrade', (t) => out({ type: 'upgrade', transport: t.name }));
});
socket.on('connect', () => out({ type: 'connect', id: socket.id, recovered: socket.recovered, transport: transport() }));
socket.on('disconnect', (reason) => out({ type: 'disconnect', reason }));
socket.on('connect_error', (err) => out({ type: 'connect_error', message: err.message, data: err.data ?? null }));
socket.onAny((event, ...args) => {
  const last = args[args.length - 1];
  if (typeof last === 'function') {
    const ack = args.pop();
    out({ type: 'call', event, args: toJson(args) });
    const answer = (opts.answers || {})[event];
    if (answer !== undefined) ack(...fromJson(answer));
    return;
  }
  out({ type: 'event', event, args: toJson(args) });
});

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const cmd = JSON.parse(line);
  switch (cmd.op) {
    case 'emit':
      if (cmd.ack) {
        socket.timeout(cmd.timeout || 5000).emit(cmd.event, ...fromJson(cmd.args || []), (err, ...res) =>
          out({ type: 'ack', id: cmd.id, error: err ? err.message : null, args: toJson(res) }));
      } else {
        socket.emit(cmd.event, ...fromJson(cmd.args || []));
      }
      break;
    case 'disconnect':
      socket.disconnect();
      break;
    case 'connect':
      socket.connect();
      break;
    case 'close-engine':
      // The transport drops (as on a network failure): socket.io-client
      // reconnects and asks for recovery.
      socket.io.engine.close();
      break;
    case 'state':
      out({ type: 'state', connected: socket.connected, id: socket.id, transport: transport() });
      break;
    case 'exit':
      process.exit(0);
  }
});
rl.on('close', () => process.exit(0));
