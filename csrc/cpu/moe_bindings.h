// The Python-facing mixture-of-experts op (moe_bindings.cpp), registered by bindings.cpp.
#pragma once

#include <torch/extension.h>

namespace protoserve {

// out [T, H] = the experts' weighted sum for hidden [T, H] (bfloat16), routing [T, k]
// (expert ids int64, weights float32), experts packed as moe_bf16.h describes
// (engine.ops.pack_moe_gate_up / pack_moe_down). Checks every tensor, then runs moe_bf16.
void moe_bf16_op(torch::Tensor& out, const torch::Tensor& hidden,
                 const torch::Tensor& expert_ids, const torch::Tensor& weights,
                 const torch::Tensor& gate_up, const torch::Tensor& down, int64_t intermediate,
                 bool round_weighted);

}  // namespace protoserve
