// decode_layers_bf16: a pure-decode step through every decoder layer in one call.
//
// At batch 1 a layer's kernels take ~0.5 ms and the Python between them (module calls,
// views, output allocation, ten dispatches) ~0.05 ms, ~8% of the step. Here the same kernels
// run back to back from C++ on scratch rows the caller allocates once per step:
//
//   normed = rms_norm(hidden)                      qkv = normed . Wqkv (+ b)
//   rotary(q, k in qkv)   write k, v to the cache   attn = paged_decode_attention(q)
//   proj = attn . Wo (+ b)                         normed = rms_norm(hidden += proj)
//   gate_up = normed . Wgu (+ b)   act = silu(gate) * up   proj = act . Wdown (+ b)
//   hidden += proj  (rounded to bf16 as torch's bf16 add rounds)
//
// With adapters (lora_row_slots set) each projection's output gets its rows' LoRA updates
// right after the projection, as engine/layers/lora.py's LoRALinear adds them.
//
// Same kernels, same order, same roundings as the per-op path, so outputs are bit-identical
// (tests/engine/models/test_decode_layers.py compares them).
#include <initializer_list>

#include "cpu_ops.h"

namespace protoserve {
namespace {

void add_in_place(bf16_t* hidden, const bf16_t* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    hidden[i] = float_to_bf16(bf16_to_float(hidden[i]) + bf16_to_float(delta[i]));
}

// DecoderLayerWeights::lora's order.
enum LoRAProjectionIndex { kLoRAQkv, kLoRAO, kLoRAGateUp, kLoRADown };

// out [rows, width] += the rows' adapter updates for input [rows, in_features].
void add_lora(const DecodeLayersArgs& a, const LoRAProjection& weights, bf16_t* out,
              int64_t width, const bf16_t* input, int64_t in_features,
              const std::initializer_list<int64_t>& slice_sizes) {
  if (a.lora_row_slots == nullptr) return;
  lora_bf16({out, width, input, in_features, weights, a.lora_row_slots, a.num_seqs, in_features,
             a.lora_slots, a.lora_max_rank, static_cast<int64_t>(slice_sizes.size()),
             slice_sizes.begin()});
}

}  // namespace

void decode_layers_bf16(const DecodeLayersArgs& a) {
  const int64_t rows = a.num_seqs, hidden = a.hidden_size, dim = a.head_dim;
  const int64_t q_width = a.num_heads * dim, kv_width = a.num_kv_heads * dim;
  const int64_t qkv_width = q_width + 2 * kv_width, inter = a.intermediate;
  for (int64_t l = 0; l < a.num_layers; ++l) {
    const DecoderLayerWeights& w = a.layers[l];
    rms_norm_bf16({a.hidden, hidden, nullptr, 0, w.input_norm, a.normed, rows, hidden, a.eps});
    linear_bf16({a.qkv, qkv_width, a.normed, hidden, w.qkv, w.qkv_bias, rows, hidden, qkv_width});
    add_lora(a, w.lora[kLoRAQkv], a.qkv, qkv_width, a.normed, hidden,
             {q_width, kv_width, kv_width});
    // q and k heads are adjacent in qkv: one rotation covers both.
    rotary_bf16({a.qkv, qkv_width, a.cos, a.signed_sin, rows, a.num_heads + a.num_kv_heads, dim});
    write_kv_cache({ScalarKind::kBFloat16, {a.qkv + q_width, qkv_width, dim},
                    {a.qkv + q_width + kv_width, qkv_width, dim}, rows, w.kv_cache, a.cache,
                    a.slot_mapping});
    paged_decode_attention({ScalarKind::kBFloat16, {a.attn, q_width, dim}, {a.qkv, qkv_width, dim},
                            w.kv_cache, a.cache, rows, a.num_heads, a.tables, a.context_lens,
                            a.scale});
    linear_bf16({a.proj, hidden, a.attn, q_width, w.o, w.o_bias, rows, q_width, hidden});
    add_lora(a, w.lora[kLoRAO], a.proj, hidden, a.attn, q_width, {hidden});
    rms_norm_bf16({a.hidden, hidden, a.proj, hidden, w.post_norm, a.normed, rows, hidden, a.eps});
    linear_bf16({a.gate_up, 2 * inter, a.normed, hidden, w.gate_up, w.gate_up_bias, rows, hidden,
                 2 * inter});
    add_lora(a, w.lora[kLoRAGateUp], a.gate_up, 2 * inter, a.normed, hidden, {inter, inter});
    silu_and_mul_bf16({a.gate_up, 2 * inter, a.act, rows, inter});
    linear_bf16({a.proj, hidden, a.act, inter, w.down, w.down_bias, rows, inter, hidden});
    add_lora(a, w.lora[kLoRADown], a.proj, hidden, a.act, inter, {hidden});
    add_in_place(a.hidden, a.proj, rows * hidden);
  }
}

}  // namespace protoserve
