// grpc-js (Node's http2) as a caller of grpcmux's proxy endpoint.
// Usage: node client.js PORT CLIENT_ID — runs each case, prints one JSON object per case.
"use strict";
const grpc = require("@grpc/grpc-js");

const [port, clientId] = process.argv.slice(2);
const client = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
const raw = (b) => b;
const path = (name) => `/test.Echo/${name}`;

function metadata(pairs) {
  const md = new grpc.Metadata();
  for (const [key, value] of Object.entries(pairs)) md.add(key, value);
  return md;
}

function deadline(seconds) {
  return { deadline: Date.now() + seconds * 1000 };
}

function status(error) {
  return error ? { code: grpc.status[error.code], details: error.details } : { code: "OK" };
}

function unary(pairs, seconds = 10) {
  return new Promise((resolve) => {
    let headers = {};
    let outcome = null;
    const call = client.makeUnaryRequest(
      path("Unary"), raw, raw, Buffer.from("ping"), metadata(pairs), deadline(seconds),
      (error, reply) => { outcome = { ...status(error), reply: reply ? reply.toString() : null }; });
    call.on("metadata", (md) => { headers = md.getMap(); });
    // The status event comes after the callback, with the trailers.
    call.on("status", (s) => resolve({ ...outcome, headers, trailers: s.metadata.getMap() }));
  });
}

function serverStream(pairs) {
  return new Promise((resolve) => {
    const replies = [];
    const call = client.makeServerStreamRequest(
      path("ServerStream"), raw, raw, Buffer.alloc(70000, "s"), metadata(pairs), deadline(10));
    call.on("data", (m) => replies.push(m.length));
    call.on("error", (error) => resolve({ ...status(error), replies }));
    call.on("end", () => resolve({ code: "OK", replies }));
  });
}

function clientStream(pairs) {
  return new Promise((resolve) => {
    const call = client.makeClientStreamRequest(
      path("ClientStream"), raw, raw, metadata(pairs), deadline(10),
      (error, reply) => resolve({ ...status(error), reply: reply ? reply.toString() : null }));
    for (const part of ["a", "b", "c"]) call.write(Buffer.from(part));
    call.end();
  });
}

function bidi(pairs) {
  return new Promise((resolve) => {
    const echoed = [];
    const call = client.makeBidiStreamRequest(path("Bidi"), raw, raw, metadata(pairs), deadline(10));
    call.on("data", (m) => {
      echoed.push(m.toString());
      if (echoed.length === 1) call.write(Buffer.from("y"));
      else call.end();
    });
    call.on("error", (error) => resolve({ ...status(error), echoed }));
    call.on("end", () => resolve({ code: "OK", echoed }));
    call.write(Buffer.from("x"));
  });
}

async function main() {
  const lab = { "client-id": clientId };
  const cases = {
    unary: () => unary({ ...lab, "x-header-h": "v", "x-trailer-t": "w" }),
    server_stream: () => serverStream({ ...lab, "x-count": "3" }),
    client_stream: () => clientStream(lab),
    bidi: () => bidi(lab),
    backend_status: () => unary({ ...lab, "x-fail": "NOT_FOUND nope" }),
    unknown_client: () => unary({ "client-id": "nobody" }),
    deadline: () => unary({ ...lab, "x-wait": "1" }, 0.5),
  };
  for (const [name, run] of Object.entries(cases)) {
    process.stdout.write(JSON.stringify({ case: name, ...(await run()) }) + "\n");
  }
  client.close();
}

main().catch((error) => {
  process.stderr.write(`${error.stack}\n`);
  process.exit(1);
});
