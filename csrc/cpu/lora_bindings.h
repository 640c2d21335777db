// The Python-facing multi-LoRA op (lora_bindings.cpp), registered by bindings.cpp, and the
// adapters of decode_layers_bf16's layers.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "cpu_ops.h"

namespace protoserve {

// out [T, N] += each row's adapter update (lora_bf16.h) for input [T, K]; a [S*n*R, K] and
// b_t [S*n*R, N] bfloat16, ranks [S, n] int32, row_slots [T] int32 (-1: base-model row),
// slice_sizes the projection's n slice widths (summing to N).
void lora_bf16_op(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& a,
                  const torch::Tensor& b_t, const torch::Tensor& ranks,
                  const torch::Tensor& row_slots, const std::vector<int64_t>& slice_sizes,
                  int64_t max_rank);

// decode_layers_bf16's `lora`: None, or (row_slots [T] int32, per layer four (a, b_t, ranks)
// for qkv, o, gate_up, down, max_rank). Checks them against `args`' shapes and points
// `weights[l].lora` and `args.lora_*` at them.
void attach_decode_lora(const pybind11::object& lora, std::vector<DecoderLayerWeights>& weights,
                        DecodeLayersArgs& args);

}  // namespace protoserve
