// A Node client of embedding.v1, written as a microservice would: stubs generated
// by `buf generate` (protoc-gen-es), Connect-ES speaking plain gRPC over HTTP/2,
// and the standard health check through @grpc/grpc-js and grpc-health-check.
//
//   node check.mjs HOST:PORT GENERATED_DIR
//
// Prints one JSON object: health statuses, Embed's vectors, StreamEmbed's replies.
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import path from "node:path";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";

const require = createRequire(import.meta.url);
const { service: healthService } = require("grpc-health-check");

const [target, generated] = process.argv.slice(2);
const stubs = await import(pathToFileURL(path.join(generated, "embedding/v1/embedding_pb.js")).href);
const { EmbeddingService, OutputType } = stubs;

function health(service) {
  const Client = grpc.makeClientConstructor(healthService, "grpc.health.v1.Health");
  const client = new Client(target, grpc.credentials.createInsecure());
  return new Promise((resolve, reject) => {
    client.check({ service }, { deadline: Date.now() + 10_000 }, (error, reply) => {
      client.close();
      if (error) reject(error);
      else resolve(reply.status);
    });
  });
}

const transport = createGrpcTransport({ baseUrl: `http://${target}`, httpVersion: "2" });
const client = createClient(EmbeddingService, transport);

async function* requests() {
  yield { requestId: "a", inputs: ["first streamed text"] };
  yield { requestId: "bad", inputs: [""] };
  yield { requestId: "b", inputs: ["second streamed text", "third"] };
}

const embed = await client.embed(
  { requestId: "node-1", inputs: ["hello from node", "a second text"], outputs: [OutputType.DENSE, OutputType.BINARY] },
  { timeoutMs: 30_000 },
);
const stream = [];
for await (const reply of client.streamEmbed(requests(), { timeoutMs: 30_000 })) {
  stream.push({
    requestId: reply.requestId,
    error: reply.error ? { code: reply.error.code, message: reply.error.message } : null,
    dense: reply.embeddings.map((e) => (e.vector.case === "dense" ? Array.from(e.vector.value.values) : null)),
  });
}

const vectors = (embedding) => embedding.vector.case === "dense"
  ? { index: embedding.index, dense: Array.from(embedding.vector.value.values) }
  : { index: embedding.index, bits: Buffer.from(embedding.vector.value.bits).toString("hex") };

console.log(JSON.stringify({
  health: { "": await health(""), "embedding.v1.EmbeddingService": await health("embedding.v1.EmbeddingService") },
  embed: { model: embed.model, requestId: embed.requestId, usage: embed.usage, embeddings: embed.embeddings.map(vectors) },
  stream,
}));
