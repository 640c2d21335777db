// The CPU kernels' entry points: raw pointers, element strides and shapes only.
// bindings.cpp validates tensors and fills these structs.
//
// Row views ([tokens, heads, head_dim] with a contiguous last dim) carry two strides so the
// kernels read q/k/v straight out of a fused qkv projection without a copy.
#pragma once

#include <cstdint>
#include <string>

#include "cpu_types.h"
#include "linear_int.h"
#include "lora_bf16.h"

namespace protoserve {

enum class ScalarKind { kFloat32, kBFloat16 };

struct RowsView {
  void* data;
  int64_t token_stride;
  int64_t head_stride;
};

struct CacheShape {
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_kv_heads;
  int64_t head_dim;
};

struct WriteKvArgs {
  ScalarKind kind;
  RowsView key;    // [num_tokens, num_kv_heads, head_dim]
  RowsView value;  // same shape
  int64_t num_tokens;
  void* kv_cache;
  CacheShape cache;
  const int64_t* slot_mapping;  // [num_tokens]; a negative slot marks a padding row
  // An int8 cache (kv_int8.h): rows quantized on write; cache.head_dim is the row size
  // (head_dim + 4) and `kind` the key/value rows' type.
  bool int8_cache = false;
};

struct DecodeArgs {
  ScalarKind kind;
  RowsView out;    // [num_seqs, num_heads, head_dim]
  RowsView query;  // [num_seqs, num_heads, head_dim]
  const void* kv_cache;
  CacheShape cache;
  int64_t num_seqs;
  int64_t num_heads;
  BlockTables block_tables;     // [num_seqs, >= ceil(context_len / block_size)]
  const int64_t* context_lens;  // [num_seqs], each >= 1, including the new token
  float scale;
  // Layer options (0: none; engine/attention/backend.py). With a window W the query at
  // position p = len - 1 sees keys at positions > p - W only, and blocks wholly before them
  // are never read; a soft-cap C turns each scaled score s into C * tanh(s / C).
  int64_t sliding_window = 0;
  float soft_cap = 0.0f;
  // As in WriteKvArgs: `kind` is the query's and out's type, cache.head_dim the row size.
  bool int8_cache = false;
  // [num_heads] float32 attention sinks (GPT-OSS), or null: each head's logit joins the
  // softmax denominator as exp(sink - max) and has no value row.
  const float* sinks = nullptr;
};

struct PrefillArgs {
  ScalarKind kind;
  RowsView out;    // [num_query_tokens, num_heads, head_dim]
  RowsView query;  // [num_query_tokens, num_heads, head_dim]
  const void* kv_cache;
  CacheShape cache;
  int64_t num_heads;
  BlockTables block_table;  // one row covering [0, context_start + num_query_tokens)
  int64_t context_start;    // query row i sits at position context_start + i
  int64_t num_query_tokens;
  float scale;
  int64_t sliding_window = 0;  // as in DecodeArgs, for each query row's position
  float soft_cap = 0.0f;
  const float* sinks = nullptr;  // as in DecodeArgs
};

// out[num_tokens, out_features] = input . W^T (+ bias), bfloat16 only; W packed as described
// in linear_bf16.cpp ([ceil(out_features / 16), in_features / 2, 16, 2], in_features even).
struct LinearArgs {
  void* output;
  int64_t output_stride;  // elements between token rows
  const void* input;
  int64_t input_stride;
  const void* packed_weight;
  const void* bias;  // [out_features] or nullptr
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
};

// Fused bfloat16 pointwise ops (pointwise_bf16.cpp). Rows have a contiguous last dim; outputs
// are contiguous [num_tokens, width].
struct NormArgs {
  bf16_t* residual;  // [num_tokens, hidden]: normalised; first += delta when delta is set
  int64_t residual_stride;
  const bf16_t* delta;  // nullptr or [num_tokens, hidden]
  int64_t delta_stride;
  const bf16_t* weight;  // [hidden]
  bf16_t* out;
  int64_t num_tokens;
  int64_t hidden;
  float eps;
  // Gemma's RMSNorm: out = bf16(x * rsqrt(mean(x^2) + eps) * (1 + w)) in fp32, one rounding.
  bool gemma = false;
};

// Per-head RMSNorm in place (Qwen3 / Gemma 3's q and k norms before RoPE): heads
// [0, num_heads) of every token row, each head_dim wide and contiguous.
struct HeadNormArgs {
  bf16_t* x;
  int64_t token_stride;
  int64_t num_tokens;
  int64_t num_heads;
  int64_t head_dim;
  const bf16_t* weight;  // [head_dim]
  float eps;
  bool gemma;
};

// Mixture-of-experts routing (moe_route.cpp): softmax over every expert in fp32, the top_k
// largest (ties: lower expert first), optionally renormalised to sum to one, and rounded to
// bfloat16 values unless float32_weights (Mixtral keeps fp32; Qwen3-MoE casts).
struct MoeRouteArgs {
  const bf16_t* logits;  // [num_tokens, num_experts], rows logits_stride apart
  int64_t logits_stride;
  int64_t num_tokens;
  int64_t num_experts;
  int64_t top_k;
  bool renormalize;
  bool float32_weights;
  float* weights;       // [num_tokens, top_k]
  int64_t* expert_ids;  // [num_tokens, top_k]
};

struct SiluMulArgs {
  const bf16_t* gate_up;  // [num_tokens, 2 * intermediate] = [gate | up]
  int64_t gate_up_stride;
  bf16_t* out;  // [num_tokens, intermediate]
  int64_t num_tokens;
  int64_t intermediate;
};

struct RotaryArgs {
  bf16_t* x;  // [num_tokens, num_heads, head_dim], rotated in place; heads contiguous
  int64_t token_stride;
  const bf16_t* cos;         // [num_tokens, head_dim]
  const bf16_t* signed_sin;  // [num_tokens, head_dim]
  int64_t num_tokens;
  int64_t num_heads;
  int64_t head_dim;
};

// One decoder layer for decode_layers_bf16: bfloat16 weights, every projection packed for
// linear_bf16 (biases may be null), the layer's paged KV cache and its family switches
// (a null pointer: the layer has no such part).
struct DecoderLayerWeights {
  const bf16_t* input_norm;
  const void* qkv;
  const void* qkv_bias;
  const void* o;
  const void* o_bias;
  const bf16_t* post_norm;
  const void* gate_up;
  const void* gate_up_bias;
  const void* down;
  const void* down_bias;
  void* kv_cache;
  const bf16_t* q_norm = nullptr;  // per-head norms before RoPE (Qwen3, Gemma 3)
  const bf16_t* k_norm = nullptr;
  // Gemma's sandwich: post_norm then norms the attention output before the residual add,
  // these the MLP's input and output.
  const bf16_t* pre_ff_norm = nullptr;
  const bf16_t* post_ff_norm = nullptr;
  // A mixture-of-experts MLP (gate_up/down unused): router [E, H] packed, experts packed as
  // moe_bf16.h describes.
  const void* router = nullptr;
  const bf16_t* experts_gate_up = nullptr;
  const bf16_t* experts_down = nullptr;
  int64_t num_experts = 0;
  int64_t sliding_window = 0;  // 0: full attention
  // The layer's RoPE table and KV cache group (slots and block tables).
  const bf16_t* cos = nullptr;         // [num_seqs, head_dim]
  const bf16_t* signed_sin = nullptr;  // [num_seqs, head_dim]
  const int64_t* slot_mapping = nullptr;
  BlockTables tables = {};
  // Resident adapters of qkv, o, gate_up, down (DecodeLayersArgs::lora_row_slots set only).
  LoRAProjection lora[4] = {};
  // Int8 / int4 weights of qkv, o, gate_up, down (linear_int) where `packed` is set; the
  // matching qkv / o / gate_up / down pointer above is then that weight's packed bytes too.
  IntWeight int_weights[4] = {};
};

// A pure-decode step (one new token per sequence) through every decoder layer: the same
// kernels, in the same order and with the same roundings, as the per-op Python path.
struct DecodeLayersArgs {
  const DecoderLayerWeights* layers;
  int64_t num_layers;
  bf16_t* hidden;  // [num_seqs, hidden_size] residual stream, updated in place
  int64_t num_seqs;
  int64_t hidden_size;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t intermediate;
  float eps;
  float scale;
  CacheShape cache;
  const int64_t* context_lens;
  // Scratch rows, [num_seqs, width] each: normed (hidden), qkv (q + 2 kv), attn (q),
  // proj (hidden), gate_up (2 * intermediate), act (intermediate).
  bf16_t* normed;
  bf16_t* qkv;
  bf16_t* attn;
  bf16_t* proj;
  bf16_t* gate_up;
  bf16_t* act;
  // Family switches (engine/models/decoder_spec.py).
  bool gemma_norm = false;
  bool gelu_tanh = false;  // GeGLU instead of SwiGLU
  float soft_cap = 0.0f;   // attention logit soft-cap (0: none)
  float residual_multiplier = 1.0f;
  // Mixture-of-experts layers: routing and scratch ([num_seqs, num_experts] logits,
  // [num_seqs, top_k] weights and ids).
  int64_t moe_top_k = 0;
  int64_t moe_intermediate = 0;
  bool moe_renormalize = false;
  bool moe_float32_weights = false;
  bf16_t* router_logits = nullptr;
  float* route_weights = nullptr;
  int64_t* route_ids = nullptr;
  // Multi-LoRA (lora_bf16.h): each row's slot (-1: base model), or nullptr for no adapters.
  const int32_t* lora_row_slots = nullptr;
  int64_t lora_slots = 0;
  int64_t lora_max_rank = 0;
};

void write_kv_cache(const WriteKvArgs& args);
void paged_decode_attention(const DecodeArgs& args);
void paged_prefill_attention(const PrefillArgs& args);
void linear_bf16(const LinearArgs& args);  // only with has_avx512_bf16()
// Which kernel linear_bf16 runs: "auto" (AMX from 4 tokens where has_amx_bf16()), "avx512"
// or "amx"; returns the previous choice, throws std::invalid_argument on an unknown name.
std::string set_linear_kernel(const std::string& name);
// True where the CPU has AMX-BF16 and the OS grants this process the tile state.
bool has_amx_bf16();
void rms_norm_bf16(const NormArgs& args);
void silu_and_mul_bf16(const SiluMulArgs& args);
void rotary_bf16(const RotaryArgs& args);
void gelu_tanh_and_mul_bf16(const SiluMulArgs& args);  // gelu_tanh(gate) * up, same layout
void head_norm_bf16(const HeadNormArgs& args);
void moe_route(const MoeRouteArgs& args);
void decode_layers_bf16(const DecodeLayersArgs& args);  // only with has_avx512_bf16()

// True when this build uses the AVX-512 BF16 kernels for bfloat16 (else portable C++).
bool has_avx512_bf16();

}  // namespace protoserve
