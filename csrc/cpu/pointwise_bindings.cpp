// Tensor checks of the fused bfloat16 pointwise ops and the MoE routing, then raw pointers
// into pointwise_bf16.cpp / moe_route.cpp. Every op releases the GIL while it runs.
#include <optional>

#include "decode_bindings.h"
#include "step_timers.h"

namespace protoserve {

void check_rows(const torch::Tensor& t, const char* name, int64_t rows, int64_t width) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16, name,
              " must be a bfloat16 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == width &&
                  (t.stride(1) == 1 || width == 1),
              name, " must be [", rows, ", ", width, "] with a contiguous last dim, got ",
              t.sizes());
}

namespace {

void check_weight(const torch::Tensor& weight, int64_t n, const char* name) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kBFloat16 &&
                  weight.is_contiguous() && weight.numel() == n,
              name, " must be a contiguous bfloat16 [", n, "]");
}

void rms_norm_op(torch::Tensor& out, torch::Tensor& residual,
                 const std::optional<torch::Tensor>& delta, const torch::Tensor& weight,
                 double eps, bool gemma) {
  const int64_t rows = residual.size(0), hidden = weight.numel();
  check_rows(residual, "residual", rows, hidden);
  check_rows(out, "out", rows, hidden);
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  check_weight(weight, hidden, "weight");
  if (delta.has_value()) check_rows(*delta, "delta", rows, hidden);
  NormArgs args{bf16_data(residual),
                residual.stride(0),
                delta.has_value() ? bf16_data(*delta) : nullptr,
                delta.has_value() ? delta->stride(0) : 0,
                bf16_data(weight),
                bf16_data(out),
                rows,
                hidden,
                static_cast<float>(eps),
                gemma};
  pybind11::gil_scoped_release no_gil;
  const StepTimer timer(StepRegion::kNorms);
  rms_norm_bf16(args);
}

// silu / gelu_tanh (gate) * up over a fused [gate | up].
void gated_op(torch::Tensor& out, const torch::Tensor& gate_up, bool gelu_tanh) {
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  check_rows(gate_up, "gate_up", rows, 2 * width);
  check_rows(out, "out", rows, width);
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  SiluMulArgs args{bf16_data(gate_up), gate_up.stride(0), bf16_data(out), rows, width};
  pybind11::gil_scoped_release no_gil;
  const StepTimer timer(StepRegion::kActivation);
  if (gelu_tanh) {
    gelu_tanh_and_mul_bf16(args);
  } else {
    silu_and_mul_bf16(args);
  }
}

void rotary_op(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& signed_sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kBFloat16 && x.device().is_cpu(),
              "x must be a bfloat16 CPU tensor [tokens, heads, head_dim]");
  const int64_t rows = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(dim % 2 == 0 && x.stride(2) == 1 && x.stride(1) == dim,
              "x needs contiguous heads of an even head_dim");
  check_rows(cos, "cos", rows, dim);
  check_rows(signed_sin, "signed_sin", rows, dim);
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous(), "tables must be contiguous");
  RotaryArgs args{bf16_data(x), x.stride(0), bf16_data(cos), bf16_data(signed_sin),
                  rows, heads, dim};
  pybind11::gil_scoped_release no_gil;
  const StepTimer timer(StepRegion::kRotary);
  rotary_bf16(args);
}

// x [tokens, heads, head_dim] (contiguous heads): each head normed in place.
void head_norm_op(torch::Tensor& x, const torch::Tensor& weight, double eps, bool gemma) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kBFloat16 && x.device().is_cpu(),
              "x must be a bfloat16 CPU tensor [tokens, heads, head_dim]");
  const int64_t dim = x.size(2);
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == dim, "x needs contiguous heads");
  check_weight(weight, dim, "weight");
  HeadNormArgs args{bf16_data(x), x.stride(0), x.size(0), x.size(1), dim, bf16_data(weight),
                    static_cast<float>(eps), gemma};
  pybind11::gil_scoped_release no_gil;
  const StepTimer timer(StepRegion::kNorms);
  head_norm_bf16(args);
}

void moe_route_op(torch::Tensor& weights, torch::Tensor& expert_ids, const torch::Tensor& logits,
                  bool renormalize, bool float32_weights) {
  TORCH_CHECK(logits.dim() == 2, "router logits must be [tokens, experts]");
  const int64_t rows = logits.size(0), experts = logits.size(1);
  check_rows(logits, "router logits", rows, experts);
  TORCH_CHECK(expert_ids.device().is_cpu() && expert_ids.scalar_type() == torch::kInt64 &&
                  expert_ids.is_contiguous() && expert_ids.dim() == 2 &&
                  expert_ids.size(0) == rows,
              "expert_ids must be a contiguous int64 [", rows, ", top_k]");
  const int64_t top_k = expert_ids.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= experts, "top_k must be in [1, ", experts, "], got ", top_k);
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == torch::kFloat32 &&
                  weights.is_contiguous() && weights.sizes() == expert_ids.sizes(),
              "routing weights must be a contiguous float32 [", rows, ", ", top_k, "]");
  MoeRouteArgs args{bf16_data(logits), logits.stride(0), rows, experts, top_k, renormalize,
                    float32_weights, weights.data_ptr<float>(), expert_ids.data_ptr<int64_t>()};
  pybind11::gil_scoped_release no_gil;
  const StepTimer timer(StepRegion::kRouter);
  moe_route(args);
}

}  // namespace

void register_pointwise_ops(pybind11::module_& m) {
  m.def("rms_norm_bf16", &rms_norm_op,
        "RMSNorm (gemma: Gemma's (1 + w) in fp32), optionally after residual += delta",
        pybind11::arg("out"), pybind11::arg("residual"), pybind11::arg("delta"),
        pybind11::arg("weight"), pybind11::arg("eps"), pybind11::arg("gemma") = false);
  m.def("silu_and_mul_bf16", [](torch::Tensor& out, const torch::Tensor& gate_up) {
    gated_op(out, gate_up, false);
  }, "silu(gate) * up over a fused [gate | up]");
  m.def("gelu_tanh_and_mul_bf16", [](torch::Tensor& out, const torch::Tensor& gate_up) {
    gated_op(out, gate_up, true);
  }, "gelu_tanh(gate) * up over a fused [gate | up] (GeGLU)");
  m.def("rotary_bf16", &rotary_op, "Rotary embedding in place: x * cos + roll(x) * sin");
  m.def("head_norm_bf16", &head_norm_op, "Per-head RMSNorm in place (q/k norms)");
  m.def("moe_route_bf16", &moe_route_op,
        "Softmax top-k routing (optionally renormalised) of router logits");
}

}  // namespace protoserve
