// Runs against a live engine: PROTOSERVE_ADDRESS=127.0.0.1:50051 npm test
// (tests/e2e/test_documented_commands.py runs it against `make serve`; without an address, every
// test skips).
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const { ProtoserveClient, grpc } = require("../protoserve");

const address = process.env.PROTOSERVE_ADDRESS;
const skip = address ? false : "set PROTOSERVE_ADDRESS to a running engine";

// A stream long enough to cancel or to outlive a deadline: as many tokens as the served
// model's context leaves after a short prompt (servers differ: the demo model serves 2048).
async function longMaxTokens(client) {
  const reply = await client.listModels();
  return reply.models[0].max_model_len - 16;
}

async function waitIdle(client, timeoutMs = 20000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const load = await client.getLoad();
    if (load.num_streams === 0 && load.num_free_kv_blocks === load.num_kv_blocks) return load;
    if (Date.now() > end) throw new Error(`engine not idle: ${JSON.stringify(load)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test("lists the served model", { skip }, async () => {
  const client = new ProtoserveClient(address);
  const reply = await client.listModels();
  assert.ok(reply.models.length >= 1);
  assert.ok(reply.models[0].max_model_len > 0);
  client.close();
});

test("completes a greedy request with the length finish reason", { skip }, async () => {
  const client = new ProtoserveClient(address);
  const result = await client.complete("Hello", { maxTokens: 5, temperature: 0, ignoreEos: true });
  assert.equal(result.finishReason, "FINISH_REASON_LENGTH");
  assert.equal(result.completionTokens, 5);
  assert.ok(result.promptTokens > 0);
  client.close();
});

test("breaking out of a stream cancels it and frees the KV blocks", { skip }, async () => {
  const client = new ProtoserveClient(address);
  const maxTokens = await longMaxTokens(client);
  let chunks = 0;
  for await (const delta of client.generate("Hi", { maxTokens, ignoreEos: true })) {
    assert.ok(Array.isArray(delta.token_ids));
    if (++chunks === 3) break;
  }
  await waitIdle(client);
  client.close();
});

test("an AbortSignal cancels the call", { skip }, async () => {
  const client = new ProtoserveClient(address);
  const controller = new AbortController();
  const maxTokens = await longMaxTokens(client);
  await assert.rejects(async () => {
    for await (const _ of client.generate("Hi", { maxTokens, ignoreEos: true,
      signal: controller.signal })) {
      controller.abort();
    }
  }, (error) => error.code === grpc.status.CANCELLED);
  await waitIdle(client);
  client.close();
});

test("a deadline ends the call with DEADLINE_EXCEEDED", { skip }, async () => {
  const client = new ProtoserveClient(address);
  const maxTokens = await longMaxTokens(client);
  await assert.rejects(
    client.complete("Hi", { maxTokens, ignoreEos: true, timeoutMs: 500 }),
    (error) => error.code === grpc.status.DEADLINE_EXCEEDED,
  );
  await waitIdle(client);
  client.close();
});

test("Admin.Abort is idempotent", { skip }, async () => {
  const client = new ProtoserveClient(address);
  const reply = await client.abort(["no-such-request"]);
  assert.deepEqual(reply.aborted_request_ids, []);
  client.close();
});
