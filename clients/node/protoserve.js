// A Node.js client of the protoserve engine: @grpc/grpc-js + @grpc/proto-loader, loading the
// contract from proto/ at runtime (no code generation step).
//
//   const { ProtoserveClient } = require("./protoserve");
//   const client = new ProtoserveClient("127.0.0.1:50051");
//   for await (const chunk of client.generate("Once upon a time", { maxTokens: 16 })) { ... }
//
// Cancellation: leaving the `for await` early (break/throw) or aborting the AbortSignal
// cancels the gRPC call; the engine frees the request's KV blocks within one step.
// Deadlines: `timeoutMs` becomes the gRPC deadline (DEADLINE_EXCEEDED when it passes).
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const FILES = ["inference.proto", "discovery.proto", "admin.proto"].map(
  (name) => path.join("protoserve", "v1", name),
);

function loadPackage() {
  const definition = protoLoader.loadSync(FILES, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto files
    longs: Number,
    enums: String, // finish reasons arrive as "FINISH_REASON_LENGTH"
    defaults: true,
    oneofs: true, // response.event names the oneof member that is set
  });
  return grpc.loadPackageDefinition(definition).protoserve.v1;
}

class ProtoserveClient {
  constructor(address, { credentials, apiKey } = {}) {
    const pkg = loadPackage();
    const creds = credentials ?? grpc.credentials.createInsecure();
    this.inference = new pkg.Inference(address, creds);
    this.discovery = new pkg.Discovery(address, creds, { channelOverride: this.inference.getChannel() });
    this.admin = new pkg.Admin(address, creds, { channelOverride: this.inference.getChannel() });
    this.metadata = new grpc.Metadata();
    if (apiKey) this.metadata.set("authorization", `Bearer ${apiKey}`);
  }

  options(timeoutMs) {
    return timeoutMs ? { deadline: new Date(Date.now() + timeoutMs) } : {};
  }

  // Yields {event: "started"|"delta"|"finished"|"usage", ...} messages of one Generate call.
  async *events(request, { timeoutMs, signal } = {}) {
    const call = this.inference.Generate(request, this.metadata, this.options(timeoutMs));
    const onAbort = () => call.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for await (const response of call) yield response;
    } finally {
      signal?.removeEventListener("abort", onAbort);
      call.cancel(); // a no-op after a normal end; otherwise the engine aborts the request
    }
  }

  // Text deltas of a text prompt.
  async *generate(prompt, { maxTokens = 16, temperature = 1.0, requestId = "", ...opts } = {}) {
    const request = {
      text: prompt,
      request_id: requestId,
      sampling: { max_tokens: maxTokens, temperature, ignore_eos: opts.ignoreEos ?? false },
    };
    for await (const response of this.events(request, opts)) {
      if (response.event === "delta") yield response.delta;
    }
  }

  // The whole completion: {text, finishReason, promptTokens, completionTokens}.
  async complete(prompt, options = {}) {
    const request = {
      text: prompt,
      request_id: options.requestId ?? "",
      sampling: {
        max_tokens: options.maxTokens ?? 16,
        temperature: options.temperature ?? 1.0,
        ignore_eos: options.ignoreEos ?? false,
      },
    };
    const result = { text: "", finishReason: null, promptTokens: 0, completionTokens: 0 };
    for await (const response of this.events(request, options)) {
      if (response.event === "started") result.promptTokens = response.started.prompt_tokens;
      else if (response.event === "delta") result.text += response.delta.text;
      else if (response.event === "finished") {
        result.finishReason = response.finished.reason;
        result.completionTokens += response.finished.completion_tokens;
      }
    }
    return result;
  }

  unary(stub, method, request, timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      stub[method](request, this.metadata, this.options(timeoutMs), (error, reply) =>
        error ? reject(error) : resolve(reply));
    });
  }

  listModels() {
    return this.unary(this.discovery, "ListModels", {});
  }

  getLoad() {
    return this.unary(this.discovery, "GetLoad", {});
  }

  abort(requestIds) {
    return this.unary(this.admin, "Abort", { request_ids: requestIds });
  }

  close() {
    this.inference.close();
  }
}

module.exports = { ProtoserveClient, grpc };
