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
// Family switches (DecodeLayersArgs / DecoderLayerWeights): per-head q/k norms before the
// rotation, Gemma's (1 + w) norms and sandwich norms, GeGLU, the attention soft-cap and each
// layer's window, Granite's residual multiplier, and mixture-of-experts MLPs (router GEMM,
// moe_route, moe_bf16) in place of the dense one. Each layer reads its own RoPE table and
// KV cache group's slots and block tables.
//
// With adapters (lora_row_slots set) each projection's output gets its rows' LoRA updates
// right after the projection, as engine/layers/lora.py's LoRALinear adds them. Int8 / int4
// projections (QuantizedLinear's int_panels) run on linear_int, as their per-op forward does.
//
// Same kernels, same order, same roundings as the per-op path, so outputs are bit-identical
// (tests/engine/models/test_decode_layers.py compares them).
#include <initializer_list>

#include "cpu_ops.h"
#include "moe_bf16.h"
#include "step_timers.h"

namespace protoserve {
namespace {

void add_in_place(bf16_t* hidden, const bf16_t* delta, int64_t n) {
  const StepTimer timer(StepRegion::kResidual);
  for (int64_t i = 0; i < n; ++i)
    hidden[i] = float_to_bf16(bf16_to_float(hidden[i]) + bf16_to_float(delta[i]));
}

// DecoderLayerWeights::lora's and int_weights' order.
enum ProjectionIndex { kQkvProj, kOProj, kGateUpProj, kDownProj };
constexpr StepRegion kProjectionRegions[] = {StepRegion::kQkv, StepRegion::kO,
                                              StepRegion::kGateUp, StepRegion::kDown};

// out [rows, out_features] = input . W (+ bias): bf16 panels on linear_bf16, int8 / int4
// weights on linear_int (which picks int8 activations or the exact kernel as it does for the
// per-op path's QuantizedLinear).
void project(const DecodeLayersArgs& a, const DecoderLayerWeights& w, ProjectionIndex index,
             const void* weight, const void* bias, bf16_t* out, int64_t out_features,
             const bf16_t* input, int64_t in_features) {
  const StepTimer timer(kProjectionRegions[index]);
  const IntWeight& q = w.int_weights[index];
  if (q.packed != nullptr) {
    linear_int({out, out_features, input, in_features, q.packed, q.scales, q.offsets, bias,
                a.num_seqs, in_features, out_features, q.bits, q.group_size});
    return;
  }
  linear_bf16({out, out_features, input, in_features, weight, bias, a.num_seqs, in_features,
               out_features});
}

// out [rows, width] += the rows' adapter updates for input [rows, in_features].
void add_lora(const DecodeLayersArgs& a, const LoRAProjection& weights, bf16_t* out,
              int64_t width, const bf16_t* input, int64_t in_features,
              const std::initializer_list<int64_t>& slice_sizes) {
  if (a.lora_row_slots == nullptr) return;
  const StepTimer timer(StepRegion::kLoRA);
  lora_bf16({out, width, input, in_features, weights, a.lora_row_slots, a.num_seqs, in_features,
             a.lora_slots, a.lora_max_rank, static_cast<int64_t>(slice_sizes.size()),
             slice_sizes.begin()});
}

// out = rms_norm(x) with the step's norm kind (Llama's or Gemma's); residual += delta first
// when delta is set.
void norm(const DecodeLayersArgs& a, bf16_t* x, const bf16_t* delta, const bf16_t* weight,
          bf16_t* out) {
  const int64_t hidden = a.hidden_size;
  const StepTimer timer(StepRegion::kNorms);
  rms_norm_bf16({x, hidden, delta, hidden, weight, out, a.num_seqs, hidden, a.eps, a.gemma_norm});
}

// Granite's residual multiplier, rounded as torch's `bf16 tensor * float`.
void scale_in_place(bf16_t* x, float factor, int64_t n) {
  const StepTimer timer(StepRegion::kResidual);
  for (int64_t i = 0; i < n; ++i) x[i] = float_to_bf16(bf16_to_float(x[i]) * factor);
}

// a.proj = the layer's MLP of a.normed: dense gated MLP or router + experts.
void mlp(const DecodeLayersArgs& a, const DecoderLayerWeights& w) {
  const int64_t rows = a.num_seqs, hidden = a.hidden_size, inter = a.intermediate;
  if (w.router != nullptr) {
    const int64_t experts = w.num_experts;
    {
      const StepTimer timer(StepRegion::kRouter);
      linear_bf16({a.router_logits, experts, a.normed, hidden, w.router, nullptr, rows, hidden,
                   experts});
      moe_route({a.router_logits, experts, rows, experts, a.moe_top_k, a.moe_renormalize,
                 a.moe_float32_weights, a.route_weights, a.route_ids});
    }
    const StepTimer timer(StepRegion::kExperts);
    moe_bf16({a.proj, a.normed, hidden, a.route_ids, a.route_weights, w.experts_gate_up,
              w.experts_down, rows, a.moe_top_k, experts, hidden, a.moe_intermediate,
              !a.moe_float32_weights});
    return;
  }
  project(a, w, kGateUpProj, w.gate_up, w.gate_up_bias, a.gate_up, 2 * inter, a.normed, hidden);
  add_lora(a, w.lora[kGateUpProj], a.gate_up, 2 * inter, a.normed, hidden, {inter, inter});
  {
    const StepTimer timer(StepRegion::kActivation);
    const SiluMulArgs act{a.gate_up, 2 * inter, a.act, rows, inter};
    if (a.gelu_tanh) {
      gelu_tanh_and_mul_bf16(act);
    } else {
      silu_and_mul_bf16(act);
    }
  }
  project(a, w, kDownProj, w.down, w.down_bias, a.proj, hidden, a.act, inter);
  add_lora(a, w.lora[kDownProj], a.proj, hidden, a.act, inter, {hidden});
}

}  // namespace

void decode_layers_bf16(const DecodeLayersArgs& a) {
  const int64_t rows = a.num_seqs, hidden = a.hidden_size, dim = a.head_dim;
  const int64_t q_width = a.num_heads * dim, kv_width = a.num_kv_heads * dim;
  const int64_t qkv_width = q_width + 2 * kv_width;
  const bool multiplied = a.residual_multiplier != 1.0f;
  for (int64_t l = 0; l < a.num_layers; ++l) {
    const DecoderLayerWeights& w = a.layers[l];
    norm(a, a.hidden, nullptr, w.input_norm, a.normed);
    project(a, w, kQkvProj, w.qkv, w.qkv_bias, a.qkv, qkv_width, a.normed, hidden);
    add_lora(a, w.lora[kQkvProj], a.qkv, qkv_width, a.normed, hidden,
             {q_width, kv_width, kv_width});
    if (w.q_norm != nullptr) {
      const StepTimer timer(StepRegion::kNorms);
      head_norm_bf16({a.qkv, qkv_width, rows, a.num_heads, dim, w.q_norm, a.eps, a.gemma_norm});
      head_norm_bf16({a.qkv + q_width, qkv_width, rows, a.num_kv_heads, dim, w.k_norm, a.eps,
                      a.gemma_norm});
    }
    // q and k heads are adjacent in qkv: one rotation covers both.
    {
      const StepTimer timer(StepRegion::kRotary);
      rotary_bf16(
          {a.qkv, qkv_width, w.cos, w.signed_sin, rows, a.num_heads + a.num_kv_heads, dim});
    }
    {
      const StepTimer timer(StepRegion::kAttention);
      write_kv_cache({ScalarKind::kBFloat16, {a.qkv + q_width, qkv_width, dim},
                      {a.qkv + q_width + kv_width, qkv_width, dim}, rows, w.kv_cache, a.cache,
                      w.slot_mapping});
      paged_decode_attention({ScalarKind::kBFloat16, {a.attn, q_width, dim},
                              {a.qkv, qkv_width, dim}, w.kv_cache, a.cache, rows, a.num_heads,
                              w.tables, a.context_lens, a.scale, w.sliding_window, a.soft_cap});
    }
    project(a, w, kOProj, w.o, w.o_bias, a.proj, hidden, a.attn, q_width);
    add_lora(a, w.lora[kOProj], a.proj, hidden, a.attn, q_width, {hidden});
    if (w.pre_ff_norm != nullptr) {
      // Gemma: hidden += norm(attn); the MLP reads norm(hidden) and its output is normed too.
      norm(a, a.proj, nullptr, w.post_norm, a.normed);
      add_in_place(a.hidden, a.normed, rows * hidden);
      norm(a, a.hidden, nullptr, w.pre_ff_norm, a.normed);
      mlp(a, w);
      norm(a, a.proj, nullptr, w.post_ff_norm, a.normed);
      add_in_place(a.hidden, a.normed, rows * hidden);
      continue;
    }
    if (multiplied) scale_in_place(a.proj, a.residual_multiplier, rows * hidden);
    norm(a, a.hidden, a.proj, w.post_norm, a.normed);
    mlp(a, w);
    if (multiplied) scale_in_place(a.proj, a.residual_multiplier, rows * hidden);
    add_in_place(a.hidden, a.proj, rows * hidden);
  }
}

}  // namespace protoserve
