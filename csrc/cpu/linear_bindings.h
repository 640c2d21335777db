// The Python-facing dense linear ops (linear_bindings.cpp), registered by bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>

#include "linear_int.h"

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

// linear_int over GGUF K-quant weights (engine/layers/quant/k_quants.py): scale d * scales
// and, with mins / dmin (Q4_K: values unsigned), offset -(dmin * mins) per group; d / dmin
// one fp16 per groups_per_block groups. `dequantize_into` as linear_int_op's.
void linear_int_k_quant_op(torch::Tensor& out, const torch::Tensor& input,
                           const torch::Tensor& packed, int64_t bits, int64_t group_size,
                           const torch::Tensor& scales, const std::optional<torch::Tensor>& mins,
                           const torch::Tensor& d, const std::optional<torch::Tensor>& dmin,
                           int64_t groups_per_block, const std::optional<torch::Tensor>& bias,
                           const std::optional<torch::Tensor>& dequantize_into);

// W8A8: activations quantized per token to int8 inside; packed / weight_scales by
// engine/layers/quant/w8a8.py (layout in linear_w8a8.cpp).
void linear_w8a8_op(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& packed,
                    const torch::Tensor& weight_scales, const std::optional<torch::Tensor>& bias);

// An int8 / int4 weight's tensors checked against engine/layers/quant/panels.py's layout
// (shared by linear_int_op and the fused decode layers); `super`: K-quant scales, `scales`
// then unread. in_features and num_panels as the packed tensor holds them.
struct CheckedIntWeight {
  IntWeight weight;
  int64_t in_features;
  int64_t num_panels;
};
CheckedIntWeight check_int_weight(const torch::Tensor& packed, const torch::Tensor& scales,
                                  const std::optional<torch::Tensor>& offsets, int64_t bits,
                                  int64_t group_size, const SuperBlockScales* super);

// Registers linear_int_k_quant, linear_w8a8 and their kernel switches (bindings.cpp's module).
void register_quantized_linear_ops(pybind11::module& m);

}  // namespace protoserve
