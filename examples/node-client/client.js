#!/usr/bin/env node
// A tq client in Node, written from docs/PROTOCOL.md: TLS, length-prefixed msgpack
// frames, pipelined requests matched by id; hello, submit, wait and get.
//
//   node client.js TYPE [PAYLOAD_JSON]        e.g. node client.js echo '{"x": 1}'
//
// Settings as the tq command's: TQ_BROKER (default 127.0.0.1:7470), TQ_CA and TQ_KEY
// (default: the local broker's, in $TQ_DATA or ~/.local/share/tq, as `tq up` leaves them).
"use strict";

const fs = require("fs");
const net = require("net");
const os = require("os");
const path = require("path");
const tls = require("tls");
const msgpack = require("./msgpack.js");

class Connection {
  constructor(socket) {
    this.socket = socket;
    this.nextId = 1; // id 0 is reserved for connection-level NACKs
    this.pending = new Map(); // request id -> {resolve, reject}
    this.buffer = Buffer.alloc(0);
    socket.on("data", (data) => this.receive(data));
    socket.on("error", (err) => this.failAll(err));
    socket.on("close", () => this.failAll(new Error("the broker closed the connection")));
  }

  static open(address, ca) {
    const at = address.lastIndexOf(":");
    const host = address.slice(0, at).replace(/^\[|\]$/g, "");
    const port = Number(address.slice(at + 1));
    // the broker's own CA; host name checked against the certificate's SANs
    const options = { host, port, ca, ...(net.isIP(host) ? {} : { servername: host }) };
    return new Promise((resolve, reject) => {
      const socket = tls.connect(options, () => resolve(new Connection(socket)));
      socket.once("error", reject);
    });
  }

  request(message) {
    const id = this.nextId++;
    const body = msgpack.encode({ ...message, id });
    const frame = Buffer.alloc(4 + body.length);
    frame.writeUInt32BE(body.length, 0); // 4-byte big-endian length, then one msgpack map
    body.copy(frame, 4);
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.socket.write(frame);
    });
  }

  receive(data) {
    this.buffer = Buffer.concat([this.buffer, data]);
    while (this.buffer.length >= 4) {
      const length = this.buffer.readUInt32BE(0);
      if (this.buffer.length < 4 + length) return;
      const message = msgpack.decode(this.buffer.subarray(4, 4 + length));
      this.buffer = this.buffer.subarray(4 + length);
      if (message.id === 0 && message.t === "nack") {
        this.failAll(nackError(message)); // the broker is closing the connection
        continue;
      }
      const waiter = this.pending.get(message.id);
      if (waiter === undefined) continue; // e.g. an event: not used here
      this.pending.delete(message.id);
      if (message.t === "nack") waiter.reject(nackError(message));
      else waiter.resolve(message);
    }
  }

  failAll(err) {
    for (const waiter of this.pending.values()) waiter.reject(err);
    this.pending.clear();
  }

  close() {
    this.socket.end();
  }
}

function nackError(message) {
  const err = new Error(`${message.code}: ${message.message}`);
  err.code = message.code;
  return err;
}

// JSON for printing: BigInt (64-bit integers) as decimal strings, bytes as base64
function json(value) {
  return JSON.stringify(value, (key, v) => {
    if (typeof v === "bigint") return v.toString();
    if (v && v.type === "Buffer" && Array.isArray(v.data)) return Buffer.from(v.data).toString("base64");
    return v;
  });
}

async function main() {
  const [type, payloadText] = process.argv.slice(2);
  if (!type) {
    process.stderr.write("usage: node client.js TYPE [PAYLOAD_JSON]\n");
    process.exit(2);
  }
  const payload = payloadText === undefined ? null : JSON.parse(payloadText);
  const data = process.env.TQ_DATA || path.join(process.env.XDG_DATA_HOME || path.join(os.homedir(), ".local", "share"), "tq");
  const ca = fs.readFileSync(process.env.TQ_CA || path.join(data, "tls", "ca.pem"));
  const key = process.env.TQ_KEY || fs.readFileSync(path.join(data, "admin.key"), "utf8").trim();

  const conn = await Connection.open(process.env.TQ_BROKER || "127.0.0.1:7470", ca);
  try {
    // hello and submit pipelined: the broker handles hello before it reads the next frame
    const [hello, submitted] = await Promise.all([
      conn.request({ t: "hello", v: 1, kind: "client", name: "node-example", key }),
      conn.request({ t: "submit", tasks: [{ type, payload }] }),
    ]);
    const { id, warning } = submitted.tasks[0];
    console.log(json({ server: hello.server, role: hello.role, submitted: id, warning }));

    // wait answers when the task ends, or after at most 60 s: ask again until it ends
    let waited;
    do {
      waited = await conn.request({ t: "wait", task: id, timeout: 60 });
    } while (waited.timed_out);

    const { task } = await conn.request({ t: "query", q: "get", task: id });
    console.log(json({ id: task.id, state: task.state, attempts: task.attempts, result: task.result, error: task.error }));
    process.exitCode = task.state === "succeeded" ? 0 : 5;
  } finally {
    conn.close();
  }
}

main().catch((err) => {
  process.stderr.write(`client.js: ${err.message}\n`);
  process.exitCode = err.code === "ECONNREFUSED" ? 4 : 1;
});
