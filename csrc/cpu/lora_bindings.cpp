// Tensor checks of the multi-LoRA op, then raw pointers into lora_bf16.cpp. Kept out of
// bindings.cpp, as the MoE op is.
#include "lora_bindings.h"

#include <string>
#include <tuple>

#include "lora_bf16.h"
#include "step_timers.h"

namespace protoserve {
namespace {

void check_bf16_matrix(const torch::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16 && t.is_contiguous() &&
                  t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
              name, " must be a contiguous bfloat16 CPU [", rows, ", ", cols, "], got ",
              t.sizes());
}

// The stacked factors of one projection with slices `slice_sizes` and input width `in`:
// returns their pointers and the slot count, checking every rank is in [0, max_rank].
std::pair<LoRAProjection, int64_t> checked_projection(const torch::Tensor& a,
                                                      const torch::Tensor& b_t,
                                                      const torch::Tensor& ranks, int64_t in,
                                                      const std::vector<int64_t>& slice_sizes,
                                                      int64_t max_rank, const char* name) {
  const int64_t slices = static_cast<int64_t>(slice_sizes.size());
  TORCH_CHECK(max_rank > 0 && slices > 0, name, ": max_rank and the slices must be positive");
  TORCH_CHECK(ranks.device().is_cpu() && ranks.scalar_type() == torch::kInt32 &&
                  ranks.is_contiguous() && ranks.dim() == 2 && ranks.size(1) == slices,
              name, ": ranks must be a contiguous int32 [slots, ", slices, "]");
  const int64_t slots = ranks.size(0);
  int64_t out = 0;
  for (int64_t size : slice_sizes) out += size;
  check_bf16_matrix(a, slots * slices * max_rank, in, (std::string(name) + " lora_a").c_str());
  check_bf16_matrix(b_t, slots * slices * max_rank, out, (std::string(name) + " lora_b_t").c_str());
  const int32_t* rank = ranks.data_ptr<int32_t>();
  for (int64_t i = 0; i < slots * slices; ++i)
    TORCH_CHECK(rank[i] >= 0 && rank[i] <= max_rank, name, ": rank ", rank[i],
                " outside [0, ", max_rank, "]");
  return {{static_cast<const bf16_t*>(a.data_ptr()), static_cast<const bf16_t*>(b_t.data_ptr()),
           rank},
          slots};
}

const int32_t* checked_row_slots(const torch::Tensor& row_slots, int64_t rows, int64_t slots) {
  TORCH_CHECK(row_slots.device().is_cpu() && row_slots.scalar_type() == torch::kInt32 &&
                  row_slots.is_contiguous() && row_slots.dim() == 1 && row_slots.size(0) == rows,
              "row_slots must be a contiguous int32 [", rows, "]");
  const int32_t* data = row_slots.data_ptr<int32_t>();
  for (int64_t t = 0; t < rows; ++t)
    TORCH_CHECK(data[t] >= -1 && data[t] < slots, "row_slots[", t, "] = ", data[t],
                " outside [-1, ", slots, ")");
  return data;
}

}  // namespace

void lora_bf16_op(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& a,
                  const torch::Tensor& b_t, const torch::Tensor& ranks,
                  const torch::Tensor& row_slots, const std::vector<int64_t>& slice_sizes,
                  int64_t max_rank) {
  TORCH_CHECK(has_avx512_bf16(), "lora_bf16 needs AVX512_BF16");
  for (const torch::Tensor* t : {static_cast<const torch::Tensor*>(&out), &input})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16 && t->dim() == 2 &&
                    t->stride(1) == 1,
                "out and input must be bfloat16 CPU [tokens, features] with a contiguous last "
                "dim");
  const int64_t rows = input.size(0), in = input.size(1);
  const auto [weights, slots] = checked_projection(a, b_t, ranks, in, slice_sizes, max_rank,
                                                   "lora_bf16");
  TORCH_CHECK(out.size(0) == rows && out.size(1) == b_t.size(1),
              "out must be [", rows, ", ", b_t.size(1), "], got ", out.sizes());
  LoRAArgs args{static_cast<bf16_t*>(out.data_ptr()), out.stride(0),
                static_cast<const bf16_t*>(input.data_ptr()), input.stride(0), weights,
                checked_row_slots(row_slots, rows, slots), rows, in, slots, max_rank,
                static_cast<int64_t>(slice_sizes.size()), slice_sizes.data()};
  pybind11::gil_scoped_release no_gil;
  const StepTimer timer(StepRegion::kLoRA);
  lora_bf16(args);
}

void attach_decode_lora(const pybind11::object& lora, std::vector<DecoderLayerWeights>& weights,
                        DecodeLayersArgs& args) {
  if (lora.is_none()) return;
  using Factors = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>;
  const auto [row_slots, layers, max_rank] =
      lora.cast<std::tuple<torch::Tensor, std::vector<std::vector<Factors>>, int64_t>>();
  TORCH_CHECK(layers.size() == weights.size(), "lora needs one entry per layer, got ",
              layers.size());
  const int64_t hidden = args.hidden_size, inter = args.intermediate;
  const int64_t q_width = args.num_heads * args.head_dim;
  const int64_t kv_width = args.num_kv_heads * args.head_dim;
  // (input width, slices) of qkv, o, gate_up, down: decode_layers.cpp's kLoRA* order.
  const std::vector<std::pair<int64_t, std::vector<int64_t>>> shapes = {
      {hidden, {q_width, kv_width, kv_width}}, {q_width, {hidden}}, {hidden, {inter, inter}},
      {inter, {hidden}}};
  const char* names[] = {"qkv", "o", "gate_up", "down"};
  int64_t slots = -1;
  for (size_t l = 0; l < layers.size(); ++l) {
    TORCH_CHECK(layers[l].size() == 4, "lora layer ", l, " needs four projections");
    for (size_t p = 0; p < 4; ++p) {
      const auto& [a, b_t, ranks] = layers[l][p];
      const auto [projection, projection_slots] = checked_projection(
          a, b_t, ranks, shapes[p].first, shapes[p].second, max_rank, names[p]);
      TORCH_CHECK(slots < 0 || projection_slots == slots, "every projection needs ", slots,
                  " slots");
      slots = projection_slots;
      weights[l].lora[p] = projection;
    }
  }
  args.lora_row_slots = checked_row_slots(row_slots, args.num_seqs, slots);
  args.lora_slots = slots;
  args.lora_max_rank = max_rank;
}

}  // namespace protoserve
