// Entry point of the multi-LoRA kernel (lora_bf16.cpp): raw pointers and shapes only;
// lora_bindings.cpp validates the tensors and fills LoRAArgs.
#pragma once

#include <cstdint>

#include "cpu_types.h"

namespace protoserve {

// One fused projection's resident adapters, stacked as engine/layers/lora.py lays them out:
// a projection of n slices (qkv: 3, gate_up: 2, o/down: 1) with R = max_rank keeps slot s,
// slice j at rows s*n*R + j*R .. + ranks[s, j] of
//   a    [slots * n * R, in_features]    (A_sj, row-major)
//   b_t  [slots * n * R, out_features]   (B_sj^T, non-zero only in slice j's columns)
// ranks[s, j] = 0 where slot s's adapter does not target slice j (or the slot is empty).
struct LoRAProjection {
  const bf16_t* a = nullptr;
  const bf16_t* b_t = nullptr;
  const int32_t* ranks = nullptr;  // [slots, n]
};

// out[t, slice j] += round_bf16(x[t] . A_sj^T) . B_sj^T for every row t with row_slots[t] = s
// >= 0, rounded to bf16 once per output (base-model rows, row_slots[t] = -1, are untouched).
struct LoRAArgs {
  bf16_t* output;
  int64_t output_stride;  // elements between token rows
  const bf16_t* input;
  int64_t input_stride;
  LoRAProjection weights;
  const int32_t* row_slots;  // [num_tokens], each in [-1, num_slots)
  int64_t num_tokens;
  int64_t in_features;
  int64_t num_slots;
  int64_t max_rank;            // R
  int64_t num_slices;          // n
  const int64_t* slice_sizes;  // [n], summing to out_features
};

// Only with has_avx512_bf16(); engine/layers/lora.py keeps its torch path elsewhere.
void lora_bf16(const LoRAArgs& args);

}  // namespace protoserve
