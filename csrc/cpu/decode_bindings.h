// The Python-facing pointwise ops (pointwise_bindings.cpp) and the fused decode layers
// (decode_bindings.cpp), registered by bindings.cpp.
#pragma once

#include <torch/extension.h>

#include "cpu_ops.h"

namespace protoserve {

// Rows of a bf16 CPU tensor: [rows, width] with a contiguous last dim.
void check_rows(const torch::Tensor& t, const char* name, int64_t rows, int64_t width);

inline bf16_t* bf16_data(const torch::Tensor& t) {
  return reinterpret_cast<bf16_t*>(t.data_ptr());
}

// rms_norm_bf16, silu_and_mul_bf16, gelu_tanh_and_mul_bf16, rotary_bf16, head_norm_bf16,
// moe_route.
void register_pointwise_ops(pybind11::module_& m);

// decode_layers_bf16, and the pointwise ops and step timers.
void register_decode_ops(pybind11::module_& m);

// step_timers_enable / step_timers_reset / step_timers_read (step_timers.cpp).
void register_step_timer_ops(pybind11::module_& m);

}  // namespace protoserve
