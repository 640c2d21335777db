// The Python-facing dense linear ops (linear_bindings.cpp), registered by bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace protoserve {

// out [T, N] = input [T, K] @ W^T (+ bias), W packed by engine.ops.pack_linear_weight.
void linear_bf16_op(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& packed,
                    const std::optional<torch::Tensor>& bias);

// Weight-only int8/int4 linear over panels packed by engine/layers/quant/panels.py; with
// `dequantize_into`, only the weight's bf16 panels are written there (for linear_bf16);
// `offsets` (shaped like scales): asymmetric weights w = Q * scale + offset.
void linear_int_op(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& packed,
                   const torch::Tensor& scales, const std::optional<torch::Tensor>& bias,
                   int64_t bits, int64_t group_size,
                   const std::optional<torch::Tensor>& dequantize_into,
                   const std::optional<torch::Tensor>& offsets);

// W8A8: activations quantized per token to int8 inside; packed / weight_scales by
// engine/layers/quant/w8a8.py (layout in linear_w8a8.cpp).
void linear_w8a8_op(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& packed,
                    const torch::Tensor& weight_scales, const std::optional<torch::Tensor>& bias);

}  // namespace protoserve
