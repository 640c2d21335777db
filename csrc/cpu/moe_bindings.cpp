// Tensor checks of the mixture-of-experts op, then raw pointers into moe_bf16.cpp. Kept out
// of bindings.cpp so that file stays the attention and dense ops' door.
#include "moe_bindings.h"

#include "cpu_ops.h"
#include "moe_bf16.h"
#include "step_timers.h"

namespace protoserve {

void moe_bf16_op(torch::Tensor& out, const torch::Tensor& hidden,
                 const torch::Tensor& expert_ids, const torch::Tensor& weights,
                 const torch::Tensor& gate_up, const torch::Tensor& down, int64_t intermediate,
                 bool round_weighted) {
  TORCH_CHECK(has_avx512_bf16(), "moe_bf16 needs AVX512_BF16");
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [tokens, hidden_size], got ", hidden.sizes());
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  TORCH_CHECK(hidden.device().is_cpu() && hidden.scalar_type() == torch::kBFloat16 &&
                  hidden.stride(1) == 1,
              "hidden must be a bfloat16 CPU tensor with a contiguous last dim");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kBFloat16 &&
                  out.is_contiguous() && out.sizes() == hidden.sizes(),
              "out must be a contiguous bfloat16 [", rows, ", ", width, "]");
  TORCH_CHECK(width % 2 == 0 && intermediate > 0 && intermediate % 2 == 0,
              "moe_bf16 needs an even hidden size and intermediate size, got ", width, " and ",
              intermediate);
  TORCH_CHECK(expert_ids.device().is_cpu() && expert_ids.scalar_type() == torch::kInt64 &&
                  expert_ids.is_contiguous() && expert_ids.dim() == 2 &&
                  expert_ids.size(0) == rows,
              "expert_ids must be a contiguous int64 [", rows, ", top_k]");
  const int64_t top_k = expert_ids.size(1);
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == torch::kFloat32 &&
                  weights.is_contiguous() && weights.sizes() == expert_ids.sizes(),
              "routing weights must be a contiguous float32 [", rows, ", ", top_k, "]");
  TORCH_CHECK(gate_up.dim() == 5, "gate_up must be packed 5-D panels, got ", gate_up.sizes());
  const int64_t num_experts = gate_up.size(0);
  const int64_t inter_panels = (intermediate + 15) / 16, hidden_panels = (width + 15) / 16;
  for (const torch::Tensor* t : {&gate_up, &down})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16 &&
                    t->is_contiguous() && t->dim() == 5 && t->size(0) == num_experts &&
                    t->size(3) == 16 && t->size(4) == 2,
                "expert weights must be contiguous bfloat16 panels [E, panels, K / 2, 16, 2]");
  TORCH_CHECK(gate_up.size(1) == 2 * inter_panels && gate_up.size(2) * 2 == width,
              "gate_up must be packed [", num_experts, ", ", 2 * inter_panels, ", ", width / 2,
              ", 16, 2], got ", gate_up.sizes());
  TORCH_CHECK(down.size(1) == hidden_panels && down.size(2) * 2 == intermediate,
              "down must be packed [", num_experts, ", ", hidden_panels, ", ", intermediate / 2,
              ", 16, 2], got ", down.sizes());
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  // An id outside [0, experts) would read outside the packed weights.
  for (int64_t i = 0; i < expert_ids.numel(); ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < num_experts, "expert id ", ids[i], " out of range (",
                num_experts, " experts)");
  const auto bf16 = [](const torch::Tensor& t) {
    return reinterpret_cast<bf16_t*>(t.data_ptr());
  };
  const MoeArgs args{bf16(out),     bf16(hidden), hidden.stride(0), ids,
                     weights.data_ptr<float>(),   bf16(gate_up),    bf16(down),
                     rows,          top_k,        num_experts,      width,
                     intermediate,  round_weighted};
  pybind11::gil_scoped_release no_gil;
  const StepTimer timer(StepRegion::kExperts);
  moe_bf16(args);
}

}  // namespace protoserve
