// Python bindings of the CPU ops: tensor checks, then raw pointers into the kernels.
// Every op writes into tensors the caller allocated and releases the GIL while it runs.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu_ops.h"
#include "linear_bindings.h"
#include "lora_bindings.h"
#include "moe_bindings.h"
#include "work_pool.h"

namespace {

using protoserve::BlockTables;
using protoserve::CacheShape;
using protoserve::RowsView;
using protoserve::ScalarKind;
using bf16_ptr_t = protoserve::bf16_t*;

ScalarKind kind_of(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kFloat32) return ScalarKind::kFloat32;
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16,
              "kv_cache (or, over an int8 cache, q/k/v) must be float32 or bfloat16, got ",
              t.scalar_type());
  return ScalarKind::kBFloat16;
}

CacheShape cache_shape(const torch::Tensor& kv_cache) {
  TORCH_CHECK(kv_cache.device().is_cpu(), "kv_cache must be a CPU tensor");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  return {kv_cache.size(1), kv_cache.size(2), kv_cache.size(3), kv_cache.size(4)};
}

// What the q/k/v/out rows over a cache are: the cache's dtype and row width, or for an int8
// cache (kv_int8.h: rows of head_dim values + a 4-byte scale) those of `rows`, head_dim wide.
struct RowSpec {
  torch::ScalarType dtype;
  int64_t width;
  ScalarKind kind;
  bool int8_cache;
};

RowSpec row_spec(const torch::Tensor& kv_cache, const torch::Tensor& rows) {
  if (kv_cache.scalar_type() != torch::kInt8)
    return {kv_cache.scalar_type(), kv_cache.size(4), kind_of(kv_cache), false};
  TORCH_CHECK(kv_cache.size(4) > 4, "an int8 kv_cache row is head_dim values + a 4-byte scale");
  return {rows.scalar_type(), kv_cache.size(4) - 4, kind_of(rows), true};
}

// [tokens, heads, width] with a contiguous last dim, of the spec's dtype.
RowsView rows_view(const torch::Tensor& t, const char* name, const RowSpec& spec,
                   int64_t heads) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == spec.dtype, name, " dtype ", t.scalar_type(),
              " differs from the cache's ", spec.dtype);
  TORCH_CHECK(t.dim() == 3 && t.size(1) == heads && t.size(2) == spec.width, name,
              " must be [tokens, ", heads, ", ", spec.width, "], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, name, " needs a contiguous last dim");
  return {t.data_ptr(), t.stride(0), t.stride(1)};
}

// Rows read blocks [first_needed[row] (0 when null), blocks_needed[row]) of their table.
BlockTables block_tables(const torch::Tensor& tables, int64_t num_blocks, int64_t num_rows,
                         const std::vector<int64_t>& blocks_needed,
                         const std::vector<int64_t>* first_needed = nullptr) {
  TORCH_CHECK(tables.device().is_cpu(), "block tables must be a CPU tensor");
  TORCH_CHECK(tables.scalar_type() == torch::kInt32 || tables.scalar_type() == torch::kInt64,
              "block tables must be int32 or int64");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == num_rows && tables.stride(1) == 1,
              "block tables must be [", num_rows, ", max_blocks] with a contiguous last dim");
  BlockTables view{tables.data_ptr(), tables.stride(0), tables.scalar_type() == torch::kInt32};
  // Out-of-range ids would read outside the cache: check every block the kernels will touch.
  for (int64_t row = 0; row < num_rows; ++row) {
    TORCH_CHECK(blocks_needed[row] <= tables.size(1), "context of row ", row, " needs ",
                blocks_needed[row], " blocks; its table has ", tables.size(1));
    for (int64_t i = first_needed ? (*first_needed)[row] : 0; i < blocks_needed[row]; ++i) {
      const int64_t block = view.at(row, i);
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id ", block, " out of range");
    }
  }
  return view;
}

// The step's slot mapping: contiguous 1-D int64, every slot inside the cache (negative: padding).
const int64_t* checked_slots(const torch::Tensor& slot_mapping, const CacheShape& shape) {
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == torch::kInt64 &&
                  slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous 1-D int64 CPU tensor");
  const int64_t num_slots = shape.num_blocks * shape.block_size;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.size(0); ++t)
    TORCH_CHECK(slots[t] < num_slots, "slot ", slots[t], " out of range (", num_slots, " slots)");
  return slots;
}

// The layer options of the attention kernels: 0 means none.
void check_attention_options(int64_t sliding_window, double soft_cap) {
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0: none), got ", sliding_window);
  TORCH_CHECK(std::isfinite(soft_cap) && soft_cap >= 0.0,
              "soft_cap must be finite and >= 0 (0: none), got ", soft_cap);
}

// Decode context lengths as contiguous int64 [num_seqs] (each >= 1), and the blocks each needs.
torch::Tensor checked_context_lens(const torch::Tensor& context_lens, int64_t num_seqs,
                                   int64_t block_size, std::vector<int64_t>& blocks_needed) {
  torch::Tensor lens = context_lens.to(torch::kCPU, torch::kInt64).contiguous();
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == num_seqs, "context_lens must be [num_seqs]");
  blocks_needed.resize(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = lens.data_ptr<int64_t>()[s];
    TORCH_CHECK(len >= 1, "context lengths must be >= 1");
    blocks_needed[s] = (len + block_size - 1) / block_size;
  }
  return lens;
}

void write_kv_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
                    const torch::Tensor& slot_mapping) {
  const CacheShape shape = cache_shape(kv_cache);
  const int64_t* slots = checked_slots(slot_mapping, shape);
  const int64_t num_tokens = slot_mapping.size(0);
  TORCH_CHECK(key.size(0) == num_tokens && value.size(0) == num_tokens,
              "key/value rows must match slot_mapping");
  const RowSpec spec = row_spec(kv_cache, key);
  protoserve::WriteKvArgs args{spec.kind,
                               rows_view(key, "key", spec, shape.num_kv_heads),
                               rows_view(value, "value", spec, shape.num_kv_heads),
                               num_tokens,
                               kv_cache.data_ptr(),
                               shape,
                               slots,
                               spec.int8_cache};
  pybind11::gil_scoped_release no_gil;
  protoserve::write_kv_cache(args);
}

void paged_decode_attention(torch::Tensor& out, const torch::Tensor& query,
                            const torch::Tensor& kv_cache, const torch::Tensor& tables,
                            const torch::Tensor& context_lens, double scale,
                            int64_t sliding_window, double soft_cap) {
  const CacheShape shape = cache_shape(kv_cache);
  const int64_t num_seqs = query.size(0);
  const int64_t num_heads = query.size(1);
  TORCH_CHECK(num_heads % shape.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  check_attention_options(sliding_window, soft_cap);
  std::vector<int64_t> blocks_needed;
  const torch::Tensor lens =
      checked_context_lens(context_lens, num_seqs, shape.block_size, blocks_needed);
  // With a window only the blocks from each row's window start on are read (and checked).
  std::vector<int64_t> first_needed(num_seqs, 0);
  for (int64_t s = 0; sliding_window > 0 && s < num_seqs; ++s)
    first_needed[s] =
        std::max<int64_t>(0, lens.data_ptr<int64_t>()[s] - sliding_window) / shape.block_size;
  const RowSpec spec = row_spec(kv_cache, query);
  protoserve::DecodeArgs args{spec.kind,
                              rows_view(out, "out", spec, num_heads),
                              rows_view(query, "query", spec, num_heads),
                              kv_cache.data_ptr(),
                              shape,
                              num_seqs,
                              num_heads,
                              block_tables(tables, shape.num_blocks, num_seqs, blocks_needed,
                                           &first_needed),
                              lens.data_ptr<int64_t>(),
                              static_cast<float>(scale),
                              sliding_window,
                              static_cast<float>(soft_cap),
                              spec.int8_cache};
  pybind11::gil_scoped_release no_gil;
  protoserve::paged_decode_attention(args);
}

void paged_prefill_attention(torch::Tensor& out, const torch::Tensor& query,
                             const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                             int64_t context_start, double scale, int64_t sliding_window,
                             double soft_cap) {
  const CacheShape shape = cache_shape(kv_cache);
  const int64_t num_query_tokens = query.size(0);
  const int64_t num_heads = query.size(1);
  TORCH_CHECK(num_heads % shape.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  TORCH_CHECK(context_start >= 0, "context_start must be >= 0");
  TORCH_CHECK(block_table.dim() == 1, "block_table must be 1-D");
  check_attention_options(sliding_window, soft_cap);
  const int64_t context_len = context_start + num_query_tokens;
  const std::vector<int64_t> blocks_needed{(context_len + shape.block_size - 1) / shape.block_size};
  // With a window the first query row's window start bounds the blocks read.
  const int64_t first_key =
      sliding_window > 0 ? std::max<int64_t>(0, context_start - sliding_window + 1) : 0;
  const std::vector<int64_t> first_needed{first_key / shape.block_size};
  const RowSpec spec = row_spec(kv_cache, query);
  TORCH_CHECK(!spec.int8_cache, "paged_prefill_attention reads float32/bfloat16 caches");
  protoserve::PrefillArgs args{spec.kind,
                               rows_view(out, "out", spec, num_heads),
                               rows_view(query, "query", spec, num_heads),
                               kv_cache.data_ptr(),
                               shape,
                               num_heads,
                               block_tables(block_table.unsqueeze(0), shape.num_blocks, 1,
                                            blocks_needed, &first_needed),
                               context_start,
                               num_query_tokens,
                               static_cast<float>(scale),
                               sliding_window,
                               static_cast<float>(soft_cap)};
  pybind11::gil_scoped_release no_gil;
  protoserve::paged_prefill_attention(args);
}

// Rows of a bf16 CPU tensor: [rows, width] with a contiguous last dim.
void check_rows(const torch::Tensor& t, const char* name, int64_t rows, int64_t width) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16, name,
              " must be a bfloat16 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == width &&
                  (t.stride(1) == 1 || width == 1),
              name, " must be [", rows, ", ", width, "] with a contiguous last dim, got ",
              t.sizes());
}

bf16_ptr_t bf16_data(const torch::Tensor& t) {
  return reinterpret_cast<bf16_ptr_t>(t.data_ptr());
}

void rms_norm_bf16(torch::Tensor& out, torch::Tensor& residual,
                   const std::optional<torch::Tensor>& delta, const torch::Tensor& weight,
                   double eps) {
  const int64_t rows = residual.size(0), hidden = weight.numel();
  check_rows(residual, "residual", rows, hidden);
  check_rows(out, "out", rows, hidden);
  TORCH_CHECK(out.is_contiguous() && weight.is_contiguous() &&
                  weight.scalar_type() == torch::kBFloat16,
              "out and weight must be contiguous bfloat16");
  if (delta.has_value()) check_rows(*delta, "delta", rows, hidden);
  protoserve::NormArgs args{bf16_data(residual),
                            residual.stride(0),
                            delta.has_value() ? bf16_data(*delta) : nullptr,
                            delta.has_value() ? delta->stride(0) : 0,
                            bf16_data(weight),
                            bf16_data(out),
                            rows,
                            hidden,
                            static_cast<float>(eps)};
  pybind11::gil_scoped_release no_gil;
  protoserve::rms_norm_bf16(args);
}

void silu_and_mul_bf16(torch::Tensor& out, const torch::Tensor& gate_up) {
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  check_rows(gate_up, "gate_up", rows, 2 * width);
  check_rows(out, "out", rows, width);
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  protoserve::SiluMulArgs args{bf16_data(gate_up), gate_up.stride(0), bf16_data(out), rows, width};
  pybind11::gil_scoped_release no_gil;
  protoserve::silu_and_mul_bf16(args);
}

void rotary_bf16(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& signed_sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kBFloat16 && x.device().is_cpu(),
              "x must be a bfloat16 CPU tensor [tokens, heads, head_dim]");
  const int64_t rows = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(dim % 2 == 0 && x.stride(2) == 1 && x.stride(1) == dim,
              "x needs contiguous heads of an even head_dim");
  check_rows(cos, "cos", rows, dim);
  check_rows(signed_sin, "signed_sin", rows, dim);
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous(), "tables must be contiguous");
  protoserve::RotaryArgs args{bf16_data(x), x.stride(0), bf16_data(cos), bf16_data(signed_sin),
                              rows, heads, dim};
  pybind11::gil_scoped_release no_gil;
  protoserve::rotary_bf16(args);
}


// A packed linear weight of in_features -> out_features (see linear_bf16).
void check_packed(const torch::Tensor& packed, int64_t in_features, int64_t out_features,
                  const char* name) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == torch::kBFloat16 &&
                  packed.is_contiguous() && packed.dim() == 4 && packed.size(2) == 16 &&
                  packed.size(3) == 2 && packed.size(1) * 2 == in_features &&
                  packed.size(0) == (out_features + 15) / 16,
              name, " must be packed panels of [", out_features, ", ", in_features, "]");
}

const void* checked_vector(const std::optional<torch::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16 &&
                  t->is_contiguous() && t->numel() == n,
              name, " must be a contiguous bfloat16 [", n, "]");
  return t->data_ptr();
}

// layers: per layer (input_norm, qkv, qkv_bias, o, o_bias, post_norm, gate_up, gate_up_bias,
// down, down_bias, kv_cache), biases None when absent; lora as lora_bindings.h says.
void decode_layers_bf16(torch::Tensor& hidden,
                        const std::vector<std::vector<std::optional<torch::Tensor>>>& layers,
                        const torch::Tensor& cos, const torch::Tensor& signed_sin,
                        const torch::Tensor& slot_mapping, const torch::Tensor& tables,
                        const torch::Tensor& context_lens, int64_t num_heads,
                        int64_t num_kv_heads, int64_t intermediate, double eps, double scale,
                        const pybind11::object& lora) {
  TORCH_CHECK(protoserve::has_avx512_bf16(), "decode_layers_bf16 needs AVX512_BF16");
  TORCH_CHECK(!layers.empty(), "no layers");
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  check_rows(hidden, "hidden", rows, width);
  TORCH_CHECK(hidden.is_contiguous(), "hidden must be contiguous");
  const CacheShape shape = cache_shape(*layers[0].at(10));
  const int64_t dim = shape.head_dim;
  TORCH_CHECK(shape.num_kv_heads == num_kv_heads && num_heads % num_kv_heads == 0,
              "kv cache heads do not match num_kv_heads");
  const int64_t q_width = num_heads * dim, qkv_width = q_width + 2 * num_kv_heads * dim;
  std::vector<protoserve::DecoderLayerWeights> weights;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& t = layers[l];
    TORCH_CHECK(t.size() == 11 && t[0] && t[1] && t[3] && t[5] && t[6] && t[8] && t[10],
                "layer ", l, " needs 11 entries, only biases may be None");
    check_packed(*t[1], width, qkv_width, "qkv");
    check_packed(*t[3], q_width, width, "o");
    check_packed(*t[6], width, 2 * intermediate, "gate_up");
    check_packed(*t[8], intermediate, width, "down");
    const torch::Tensor& cache = *t[10];
    TORCH_CHECK(kind_of(cache) == ScalarKind::kBFloat16, "kv caches must be bfloat16");
    const CacheShape layer_shape = cache_shape(cache);
    TORCH_CHECK(layer_shape.num_blocks == shape.num_blocks &&
                    layer_shape.block_size == shape.block_size &&
                    layer_shape.num_kv_heads == shape.num_kv_heads && layer_shape.head_dim == dim,
                "every layer's kv cache must have the same shape");
    weights.push_back({static_cast<const protoserve::bf16_t*>(checked_vector(t[0], width, "input_norm")),
                       t[1]->data_ptr(), checked_vector(t[2], qkv_width, "qkv_bias"),
                       t[3]->data_ptr(), checked_vector(t[4], width, "o_bias"),
                       static_cast<const protoserve::bf16_t*>(checked_vector(t[5], width, "post_norm")),
                       t[6]->data_ptr(), checked_vector(t[7], 2 * intermediate, "gate_up_bias"),
                       t[8]->data_ptr(), checked_vector(t[9], width, "down_bias"),
                       cache.data_ptr()});
  }
  check_rows(cos, "cos", rows, dim);
  check_rows(signed_sin, "signed_sin", rows, dim);
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous(), "tables must be contiguous");
  const int64_t* slots = checked_slots(slot_mapping, shape);
  TORCH_CHECK(slot_mapping.size(0) == rows, "slot_mapping must have one slot per row");
  std::vector<int64_t> blocks_needed;
  const torch::Tensor lens = checked_context_lens(context_lens, rows, shape.block_size,
                                                  blocks_needed);
  const auto scratch = [&](int64_t n) { return torch::empty({rows, n}, hidden.options()); };
  torch::Tensor normed = scratch(width), qkv = scratch(qkv_width), attn = scratch(q_width),
                proj = scratch(width), gate_up = scratch(2 * intermediate),
                act = scratch(intermediate);
  protoserve::DecodeLayersArgs args{weights.data(), static_cast<int64_t>(weights.size()),
                                    bf16_data(hidden), rows, width, num_heads, num_kv_heads, dim,
                                    intermediate, static_cast<float>(eps),
                                    static_cast<float>(scale), bf16_data(cos),
                                    bf16_data(signed_sin), slots, shape,
                                    block_tables(tables, shape.num_blocks, rows, blocks_needed),
                                    lens.data_ptr<int64_t>(), bf16_data(normed), bf16_data(qkv),
                                    bf16_data(attn), bf16_data(proj), bf16_data(gate_up),
                                    bf16_data(act)};
  protoserve::attach_decode_lora(lora, weights, args);
  pybind11::gil_scoped_release no_gil;
  protoserve::decode_layers_bf16(args);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "protoserve paged KV-cache kernels (CPU)";
  m.def("write_kv_cache", &write_kv_cache, "Scatter K/V rows into the paged cache");
  // The ops that take an int8 cache (engine/attention/kv_quant.py); engine.ops sends the
  // others to the torch code.
  m.attr("int8_kv_cache_ops") = pybind11::make_tuple("write_kv_cache", "paged_decode_attention");
  m.def("paged_decode_attention", &paged_decode_attention,
        "One-query attention per sequence over its paged context (sliding_window, soft_cap: "
        "0 for none)");
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "Causal attention of one sequence's query chunk over its paged context");
  m.def("linear_bf16", &protoserve::linear_bf16_op,
        "bfloat16 x . W^T (+ bias) over a weight packed in 16-row pair-column panels");
  m.def("linear_int", &protoserve::linear_int_op,
        "bfloat16 x . dequant(Q)^T (+ bias), Q int8/int4 panels with fp32 group scales "
        "(and offsets)",
        pybind11::arg("out"), pybind11::arg("input"), pybind11::arg("packed"),
        pybind11::arg("scales"), pybind11::arg("bias"), pybind11::arg("bits"),
        pybind11::arg("group_size"), pybind11::arg("dequantize_into") = pybind11::none(),
        pybind11::arg("offsets") = pybind11::none());
  protoserve::register_quantized_linear_ops(m);  // linear_int_k_quant, linear_w8a8
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm, optionally after residual += delta");
  m.def("silu_and_mul_bf16", &silu_and_mul_bf16, "silu(gate) * up over a fused [gate | up]");
  m.def("rotary_bf16", &rotary_bf16, "Rotary embedding in place: x * cos + roll(x) * sin");
  m.def("decode_layers_bf16", &decode_layers_bf16,
        "A pure-decode step through every decoder layer (the per-op kernels, one call)");
  m.def("lora_bf16", &protoserve::lora_bf16_op, "out += each row's own LoRA adapter update");
  m.def("moe_bf16", &protoserve::moe_bf16_op,
        "A mixture-of-experts layer: grouped expert GEMMs over packed panels, one call");
  m.def("set_linear_kernel", &protoserve::set_linear_kernel,
        "Pin linear_bf16's kernel: auto, avx512 or amx; returns the previous choice");
  m.def("has_amx_bf16", &protoserve::has_amx_bf16,
        "Whether linear_bf16 can use AMX-BF16 tiles here (CPU and OS permission)");
  m.def("has_avx512_bf16", &protoserve::has_avx512_bf16,
        "Whether bfloat16 runs on the AVX512_BF16 kernels");
  m.def("set_work_pool", &protoserve::work_pool::swap_enabled,
        "Kernels' regions on the work pool (True) or at::parallel_for; returns the previous");
  m.def("work_pool_stats", &protoserve::work_pool::stats,
        "(regions run on the work pool, chunks its worker threads ran) so far");
}
