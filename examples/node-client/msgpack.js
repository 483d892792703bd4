// A minimal msgpack encoder and decoder: the subset tq's wire protocol uses
// (docs/PROTOCOL.md, "Framing"): nil, booleans, integers, float 64, str, bin,
// arrays and maps. No extension types.
//
// Integers beyond JavaScript's safe range (2^53) decode to BigInt: tq's lease
// tokens (claim answers) are 64-bit. Encode a BigInt to send one back.
"use strict";

function encode(value) {
  const chunks = [];
  write(value, chunks);
  return Buffer.concat(chunks);
}

function header(chunks, small, fix, codes, length) {
  // fix: a "fix" type byte for lengths < small; codes: [8-bit?, 16-bit, 32-bit] type bytes
  if (length < small) return chunks.push(Buffer.from([fix | length]));
  const [c8, c16, c32] = codes;
  if (c8 !== undefined && length < 0x100) return chunks.push(Buffer.from([c8, length]));
  const b = Buffer.alloc(length < 0x10000 ? 3 : 5);
  if (length < 0x10000) b.writeUInt16BE(length, 1), (b[0] = c16);
  else b.writeUInt32BE(length, 1), (b[0] = c32);
  chunks.push(b);
}

function writeInt(n, chunks) {
  const big = BigInt(n);
  if (big >= 0n) {
    if (big < 0x80n) return chunks.push(Buffer.from([Number(big)]));
    if (big < 0x100n) return chunks.push(Buffer.from([0xcc, Number(big)]));
    if (big < 0x10000n) return chunks.push(Buffer.from([0xcd, Number(big) >> 8, Number(big) & 0xff]));
    const b = Buffer.alloc(big < 0x100000000n ? 5 : 9);
    if (big < 0x100000000n) (b[0] = 0xce), b.writeUInt32BE(Number(big), 1);
    else (b[0] = 0xcf), b.writeBigUInt64BE(big, 1);
    return chunks.push(b);
  }
  if (big >= -32n) return chunks.push(Buffer.from([Number(big) & 0xff]));
  const b = Buffer.alloc(9);
  (b[0] = 0xd3), b.writeBigInt64BE(big, 1);
  chunks.push(b);
}

function write(value, chunks) {
  if (value === null || value === undefined) return chunks.push(Buffer.from([0xc0]));
  if (value === false || value === true) return chunks.push(Buffer.from([value ? 0xc3 : 0xc2]));
  if (typeof value === "bigint") return writeInt(value, chunks);
  if (typeof value === "number") {
    if (Number.isSafeInteger(value)) return writeInt(value, chunks);
    const b = Buffer.alloc(9);
    (b[0] = 0xcb), b.writeDoubleBE(value, 1);
    return chunks.push(b);
  }
  if (typeof value === "string") {
    const bytes = Buffer.from(value, "utf8");
    header(chunks, 32, 0xa0, [0xd9, 0xda, 0xdb], bytes.length);
    return chunks.push(bytes);
  }
  if (value instanceof Uint8Array) {
    header(chunks, 0, 0, [0xc4, 0xc5, 0xc6], value.length);
    return chunks.push(Buffer.from(value));
  }
  if (Array.isArray(value)) {
    header(chunks, 16, 0x90, [undefined, 0xdc, 0xdd], value.length);
    for (const item of value) write(item, chunks);
    return;
  }
  const entries = value instanceof Map ? [...value] : Object.entries(value);
  header(chunks, 16, 0x80, [undefined, 0xde, 0xdf], entries.length);
  for (const [k, v] of entries) write(k, chunks), write(v, chunks);
}

function decode(buffer) {
  const state = { buf: buffer, pos: 0 };
  const value = read(state);
  if (state.pos !== buffer.length) throw new Error("msgpack: trailing bytes");
  return value;
}

function read(s) {
  const { buf } = s;
  const need = (n) => {
    if (s.pos + n > buf.length) throw new Error("msgpack: truncated");
    const at = s.pos;
    s.pos += n;
    return at;
  };
  const type = buf[need(1)];
  if (type < 0x80) return type;
  if (type >= 0xe0) return type - 0x100;
  if (type >= 0x80 && type <= 0x8f) return readMap(s, type & 0x0f);
  if (type >= 0x90 && type <= 0x9f) return readArray(s, type & 0x0f);
  if (type >= 0xa0 && type <= 0xbf) return readStr(s, type & 0x1f);
  const safe = (big) => (big >= -(2n ** 53n) && big <= 2n ** 53n ? Number(big) : big);
  switch (type) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return readBin(s, buf[need(1)]);
    case 0xc5: return readBin(s, buf.readUInt16BE(need(2)));
    case 0xc6: return readBin(s, buf.readUInt32BE(need(4)));
    case 0xca: return buf.readFloatBE(need(4));
    case 0xcb: return buf.readDoubleBE(need(8));
    case 0xcc: return buf[need(1)];
    case 0xcd: return buf.readUInt16BE(need(2));
    case 0xce: return buf.readUInt32BE(need(4));
    case 0xcf: return safe(buf.readBigUInt64BE(need(8)));
    case 0xd0: return buf.readInt8(need(1));
    case 0xd1: return buf.readInt16BE(need(2));
    case 0xd2: return buf.readInt32BE(need(4));
    case 0xd3: return safe(buf.readBigInt64BE(need(8)));
    case 0xd9: return readStr(s, buf[need(1)]);
    case 0xda: return readStr(s, buf.readUInt16BE(need(2)));
    case 0xdb: return readStr(s, buf.readUInt32BE(need(4)));
    case 0xdc: return readArray(s, buf.readUInt16BE(need(2)));
    case 0xdd: return readArray(s, buf.readUInt32BE(need(4)));
    case 0xde: return readMap(s, buf.readUInt16BE(need(2)));
    case 0xdf: return readMap(s, buf.readUInt32BE(need(4)));
    default: throw new Error(`msgpack: unsupported type byte 0x${type.toString(16)}`);
  }
}

function readStr(s, n) {
  if (s.pos + n > s.buf.length) throw new Error("msgpack: truncated");
  const text = new TextDecoder("utf-8", { fatal: true }).decode(s.buf.subarray(s.pos, s.pos + n));
  s.pos += n;
  return text;
}

function readBin(s, n) {
  if (s.pos + n > s.buf.length) throw new Error("msgpack: truncated");
  const bytes = Buffer.from(s.buf.subarray(s.pos, s.pos + n));
  s.pos += n;
  return bytes;
}

function readArray(s, n) {
  const out = [];
  for (let i = 0; i < n; i++) out.push(read(s));
  return out;
}

function readMap(s, n) {
  const out = {};
  for (let i = 0; i < n; i++) {
    const key = read(s);
    out[String(key)] = read(s);
  }
  return out;
}

module.exports = { encode, decode };
