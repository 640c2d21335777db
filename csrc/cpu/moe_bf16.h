// Entry point of the mixture-of-experts kernel (moe_bf16.cpp): raw pointers and shapes only;
// bindings.cpp validates the tensors and fills MoeArgs.
#pragma once

#include <cstdint>

#include "cpu_types.h"

namespace protoserve {

// out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = expert_ids[t, j],
// bfloat16 with fp32 accumulation. The expert weights are packed in linear_bf16's panels:
//   gate_up [E, 2 * ceil(I / 16), H / 2, 16, 2]: per expert, gate panel q at 2q, up panel q
//           at 2q + 1 (each of gate and up padded to whole panels), so one work item holds
//           both halves of the 16 columns its fused silu-and-mul needs;
//   down    [E, ceil(H / 16), I / 2, 16, 2].
struct MoeArgs {
  bf16_t* output;  // [num_tokens, hidden], contiguous
  const bf16_t* input;
  int64_t input_stride;       // elements between token rows of input [num_tokens, hidden]
  const int64_t* expert_ids;  // [num_tokens, top_k], each in [0, num_experts)
  const float* weights;       // [num_tokens, top_k] routing weights
  const bf16_t* gate_up;
  const bf16_t* down;
  int64_t num_tokens;
  int64_t top_k;
  int64_t num_experts;
  int64_t hidden;        // H, even
  int64_t intermediate;  // I, even
  // The routing weights are bfloat16 values (Qwen3-MoE casts them to the hidden dtype), so a
  // weighted expert output is rounded to bfloat16 before the sum, as torch's bf16 product is;
  // false: fp32 weights and an fp32 product (Mixtral).
  bool round_weighted;
};

void moe_bf16(const MoeArgs& args);  // only with has_avx512_bf16()

}  // namespace protoserve
