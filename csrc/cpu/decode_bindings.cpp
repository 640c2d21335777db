// Tensor checks of decode_layers_bf16 (decode_layers.cpp), then raw pointers into the kernel;
// registers it with the pointwise ops (pointwise_bindings.cpp).
#include "decode_bindings.h"

#include <array>
#include <map>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "linear_bindings.h"
#include "lora_bindings.h"
#include "tensor_checks.h"

namespace protoserve {
namespace {

using OptionalTensor = std::optional<torch::Tensor>;

// A packed linear weight of in_features -> out_features (see linear_bf16).
void check_packed(const torch::Tensor& packed, int64_t in_features, int64_t out_features,
                  const char* name) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == torch::kBFloat16 &&
                  packed.is_contiguous() && packed.dim() == 4 && packed.size(2) == 16 &&
                  packed.size(3) == 2 && packed.size(1) * 2 == in_features &&
                  packed.size(0) == (out_features + 15) / 16,
              name, " must be packed panels of [", out_features, ", ", in_features, "]");
}

const bf16_t* checked_vector(const OptionalTensor& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16 &&
                  t->is_contiguous() && t->numel() == n,
              name, " must be a contiguous bfloat16 [", n, "]");
  return bf16_data(*t);
}

// Experts packed as moe_bf16.h describes, for hidden -> intermediate -> hidden; returns E.
int64_t check_experts(const torch::Tensor& gate_up, const torch::Tensor& down, int64_t hidden,
                      int64_t intermediate) {
  TORCH_CHECK(hidden % 2 == 0 && intermediate > 0 && intermediate % 2 == 0,
              "experts need an even hidden size and intermediate size");
  for (const torch::Tensor* t : {&gate_up, &down})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16 &&
                    t->is_contiguous() && t->dim() == 5 && t->size(0) == gate_up.size(0) &&
                    t->size(3) == 16 && t->size(4) == 2,
                "expert weights must be contiguous bfloat16 panels [E, panels, K / 2, 16, 2]");
  TORCH_CHECK(gate_up.size(1) == 2 * ((intermediate + 15) / 16) && gate_up.size(2) * 2 == hidden &&
                  down.size(1) == (hidden + 15) / 16 && down.size(2) * 2 == intermediate,
              "experts are not packed for hidden ", hidden, " and intermediate ", intermediate);
  return gate_up.size(0);
}

// Layer entries (engine/models/fused_decode.py builds them in this order). The int8 / int4
// projections' scales and offsets (None for bf16 panels and symmetric weights) follow in
// qkv, o, gate_up, down order.
enum LayerEntry {
  kInputNorm, kQkv, kQkvBias, kO, kOBias, kPostNorm, kGateUp, kGateUpBias, kDown, kDownBias,
  kKvCache, kQNorm, kKNorm, kPreFfNorm, kPostFfNorm, kRouter, kExpertsGateUp, kExpertsDown,
  kQkvScales, kQkvOffsets, kOScales, kOOffsets, kGateUpScales, kGateUpOffsets, kDownScales,
  kDownOffsets, kSlotMapping, kBlockTables, kNumLayerEntries
};

// Per layer (bits, group_size) of qkv, o, gate_up, down: bits 16 for bf16 panels.
using ProjectionFormats = std::vector<std::array<std::pair<int64_t, int64_t>, 4>>;

// Projection `index` of layer `t` (weight entry `entry`, its scales at `scales_entry` and
// offsets after it) for in_features -> out_features: bf16 panels, or an int8 / int4 weight
// whose fields go to `int_weight`. Returns the weight's data.
const void* checked_projection(const std::vector<OptionalTensor>& t, LayerEntry entry,
                               LayerEntry scales_entry, std::pair<int64_t, int64_t> format,
                               int64_t in_features, int64_t out_features, const char* name,
                               IntWeight& int_weight) {
  const torch::Tensor& weight = *t[entry];
  const auto [bits, group_size] = format;
  if (bits == 16) {
    check_packed(weight, in_features, out_features, name);
    return weight.data_ptr();
  }
  TORCH_CHECK(t[scales_entry].has_value(), name, ": an int", bits, " weight needs its scales");
  const CheckedIntWeight checked = check_int_weight(
      weight, *t[scales_entry], t[scales_entry + 1], bits, group_size, nullptr);
  TORCH_CHECK(checked.in_features == in_features && checked.num_panels == (out_features + 15) / 16,
              name, " must be int", bits, " panels of [", out_features, ", ", in_features, "]");
  int_weight = checked.weight;
  return weight.data_ptr();
}

// (gemma_norm, gelu_tanh, soft_cap, residual_multiplier, moe_top_k, moe_intermediate,
//  moe_renormalize, moe_float32_weights)
using FamilySwitches = std::tuple<bool, bool, double, double, int64_t, int64_t, bool, bool>;

// layers: per layer kNumLayerEntries tensors (None where the layer has no such part);
// options: per layer (sliding_window, index into rope); rope: (cos, signed_sin) tables.
void decode_layers_op(torch::Tensor& hidden, const std::vector<std::vector<OptionalTensor>>& layers,
                      const std::vector<std::pair<int64_t, int64_t>>& options,
                      const ProjectionFormats& formats,
                      const std::vector<std::pair<torch::Tensor, torch::Tensor>>& rope,
                      const torch::Tensor& context_lens, int64_t num_heads, int64_t num_kv_heads,
                      int64_t intermediate, double eps, double scale,
                      const FamilySwitches& family, const pybind11::object& lora) {
  TORCH_CHECK(has_avx512_bf16(), "decode_layers_bf16 needs AVX512_BF16");
  TORCH_CHECK(!layers.empty() && options.size() == layers.size() &&
                  formats.size() == layers.size(),
              "one (window, rope) option and one set of projection formats per layer");
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  check_rows(hidden, "hidden", rows, width);
  TORCH_CHECK(hidden.is_contiguous(), "hidden must be contiguous");
  TORCH_CHECK(layers[0].size() == kNumLayerEntries && layers[0][kKvCache],
              "layer 0 needs ", int(kNumLayerEntries), " entries and a kv cache");
  const CacheShape shape = cache_shape(*layers[0][kKvCache]);
  const int64_t dim = shape.head_dim;
  TORCH_CHECK(shape.num_kv_heads == num_kv_heads && num_heads % num_kv_heads == 0,
              "kv cache heads do not match num_kv_heads");
  for (const auto& [cos, signed_sin] : rope) {
    check_rows(cos, "cos", rows, dim);
    check_rows(signed_sin, "signed_sin", rows, dim);
    TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous(), "tables must be contiguous");
  }
  std::vector<int64_t> blocks_needed;
  const torch::Tensor lens = checked_context_lens(context_lens, rows, shape.block_size,
                                                  blocks_needed);
  const auto [gemma_norm, gelu_tanh, soft_cap, residual_multiplier, top_k, moe_inter, renormalize,
              float32_weights] = family;
  TORCH_CHECK(soft_cap >= 0.0, "soft_cap must be >= 0 (0: none)");
  const int64_t q_width = num_heads * dim, qkv_width = q_width + 2 * num_kv_heads * dim;
  // Layers of one KV cache group share their tables: each (tables, window) checked once.
  std::map<std::pair<const void*, int64_t>, BlockTables> checked_tables;
  std::vector<DecoderLayerWeights> weights;
  int64_t max_experts = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& t = layers[l];
    const auto [window, rope_index] = options[l];
    TORCH_CHECK(t.size() == kNumLayerEntries && t[kInputNorm] && t[kQkv] && t[kO] &&
                    t[kPostNorm] && t[kKvCache] && t[kSlotMapping] && t[kBlockTables],
                "layer ", l, " lacks a required entry");
    TORCH_CHECK(window >= 0 && rope_index >= 0 && rope_index < static_cast<int64_t>(rope.size()),
                "layer ", l, ": bad window or rope table index");
    const bool moe = t[kRouter].has_value();
    TORCH_CHECK(moe ? t[kExpertsGateUp] && t[kExpertsDown] : t[kGateUp] && t[kDown],
                "layer ", l, " needs gate_up and down, or router and experts");
    TORCH_CHECK(t[kQNorm].has_value() == t[kKNorm].has_value() &&
                    t[kPreFfNorm].has_value() == t[kPostFfNorm].has_value(),
                "layer ", l, ": q/k norms and pre/post feed-forward norms come in pairs");
    const auto& format = formats[l];
    const torch::Tensor& cache = *t[kKvCache];
    TORCH_CHECK(kind_of(cache) == ScalarKind::kBFloat16, "kv caches must be bfloat16");
    const CacheShape layer_shape = cache_shape(cache);
    TORCH_CHECK(layer_shape.num_blocks == shape.num_blocks &&
                    layer_shape.block_size == shape.block_size &&
                    layer_shape.num_kv_heads == shape.num_kv_heads && layer_shape.head_dim == dim,
                "every layer's kv cache must have the same shape");
    DecoderLayerWeights w{checked_vector(t[kInputNorm], width, "input_norm"), nullptr,
                          checked_vector(t[kQkvBias], qkv_width, "qkv_bias"), nullptr,
                          checked_vector(t[kOBias], width, "o_bias"),
                          checked_vector(t[kPostNorm], width, "post_norm"),
                          nullptr, nullptr, nullptr, nullptr, cache.data_ptr()};
    w.qkv = checked_projection(t, kQkv, kQkvScales, format[0], width, qkv_width, "qkv",
                               w.int_weights[0]);
    w.o = checked_projection(t, kO, kOScales, format[1], q_width, width, "o", w.int_weights[1]);
    if (moe) {
      w.num_experts = check_experts(*t[kExpertsGateUp], *t[kExpertsDown], width, moe_inter);
      TORCH_CHECK(top_k >= 1 && top_k <= w.num_experts, "moe top_k out of range");
      check_packed(*t[kRouter], width, w.num_experts, "router");
      w.router = t[kRouter]->data_ptr();
      w.experts_gate_up = bf16_data(*t[kExpertsGateUp]);
      w.experts_down = bf16_data(*t[kExpertsDown]);
      max_experts = std::max(max_experts, w.num_experts);
    } else {
      w.gate_up = checked_projection(t, kGateUp, kGateUpScales, format[2], width,
                                     2 * intermediate, "gate_up", w.int_weights[2]);
      w.gate_up_bias = checked_vector(t[kGateUpBias], 2 * intermediate, "gate_up_bias");
      w.down = checked_projection(t, kDown, kDownScales, format[3], intermediate, width, "down",
                                  w.int_weights[3]);
      w.down_bias = checked_vector(t[kDownBias], width, "down_bias");
    }
    w.q_norm = checked_vector(t[kQNorm], dim, "q_norm");
    w.k_norm = checked_vector(t[kKNorm], dim, "k_norm");
    w.pre_ff_norm = checked_vector(t[kPreFfNorm], width, "pre_feedforward_norm");
    w.post_ff_norm = checked_vector(t[kPostFfNorm], width, "post_feedforward_norm");
    w.sliding_window = window;
    w.cos = bf16_data(rope[rope_index].first);
    w.signed_sin = bf16_data(rope[rope_index].second);
    w.slot_mapping = checked_slots(*t[kSlotMapping], shape);
    TORCH_CHECK(t[kSlotMapping]->size(0) == rows, "slot_mapping must have one slot per row");
    const torch::Tensor& tables = *t[kBlockTables];
    const auto key = std::make_pair(static_cast<const void*>(tables.data_ptr()), window);
    auto found = checked_tables.find(key);
    if (found == checked_tables.end()) {
      // With a window only the blocks from each row's window start on are read (and checked).
      std::vector<int64_t> first_needed(rows, 0);
      for (int64_t s = 0; window > 0 && s < rows; ++s)
        first_needed[s] = std::max<int64_t>(0, lens.data_ptr<int64_t>()[s] - window) /
                          shape.block_size;
      found = checked_tables.emplace(key, block_tables(tables, shape.num_blocks, rows,
                                                       blocks_needed, &first_needed)).first;
    }
    w.tables = found->second;
    weights.push_back(w);
  }
  const auto scratch = [&](int64_t n) { return torch::empty({rows, n}, hidden.options()); };
  torch::Tensor normed = scratch(width), qkv = scratch(qkv_width), attn = scratch(q_width),
                proj = scratch(width), gate_up = scratch(2 * intermediate),
                act = scratch(intermediate), router_logits = scratch(std::max<int64_t>(max_experts, 1));
  torch::Tensor route_weights = torch::empty({rows, std::max<int64_t>(top_k, 1)},
                                             hidden.options().dtype(torch::kFloat32));
  torch::Tensor route_ids = torch::empty({rows, std::max<int64_t>(top_k, 1)},
                                         hidden.options().dtype(torch::kInt64));
  DecodeLayersArgs args{weights.data(), static_cast<int64_t>(weights.size()), bf16_data(hidden),
                        rows, width, num_heads, num_kv_heads, dim, intermediate,
                        static_cast<float>(eps), static_cast<float>(scale), shape,
                        lens.data_ptr<int64_t>(), bf16_data(normed), bf16_data(qkv),
                        bf16_data(attn), bf16_data(proj), bf16_data(gate_up), bf16_data(act)};
  args.gemma_norm = gemma_norm;
  args.gelu_tanh = gelu_tanh;
  args.soft_cap = static_cast<float>(soft_cap);
  args.residual_multiplier = static_cast<float>(residual_multiplier);
  args.moe_top_k = top_k;
  args.moe_intermediate = moe_inter;
  args.moe_renormalize = renormalize;
  args.moe_float32_weights = float32_weights;
  args.router_logits = bf16_data(router_logits);
  args.route_weights = route_weights.data_ptr<float>();
  args.route_ids = route_ids.data_ptr<int64_t>();
  attach_decode_lora(lora, weights, args);
  pybind11::gil_scoped_release no_gil;
  decode_layers_bf16(args);
}

}  // namespace

void register_decode_ops(pybind11::module_& m) {
  register_pointwise_ops(m);
  register_step_timer_ops(m);
  m.def("decode_layers_bf16", &decode_layers_op,
        "A pure-decode step through every decoder layer (the per-op kernels, one call)");
}

}  // namespace protoserve
