// Python bindings of the CPU ops: tensor checks, then raw pointers into the kernels.
// Every op writes into tensors the caller allocated and releases the GIL while it runs.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu_ops.h"
#include "decode_bindings.h"
#include "linear_bindings.h"
#include "lora_bindings.h"
#include "moe_bindings.h"
#include "tensor_checks.h"
#include "work_pool.h"
#include "step_timers.h"

namespace {

using protoserve::BlockTables;
using protoserve::CacheShape;
using protoserve::RowsView;
using protoserve::ScalarKind;
using protoserve::block_tables;
using protoserve::cache_shape;
using protoserve::checked_context_lens;
using protoserve::checked_slots;
using protoserve::kind_of;

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

// The layer options of the attention kernels: 0 means none.
void check_attention_options(int64_t sliding_window, double soft_cap) {
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0: none), got ", sliding_window);
  TORCH_CHECK(std::isfinite(soft_cap) && soft_cap >= 0.0,
              "soft_cap must be finite and >= 0 (0: none), got ", soft_cap);
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

// The kernels' view of optional attention sinks: null, or num_heads float32 logits.
const float* sink_logits(const std::optional<torch::Tensor>& sinks, int64_t num_heads) {
  if (!sinks.has_value()) return nullptr;
  TORCH_CHECK(sinks->dtype() == torch::kFloat32 && sinks->is_contiguous() && sinks->dim() == 1 &&
                  sinks->size(0) == num_heads,
              "sinks must be a contiguous float32 [num_heads] tensor");
  return sinks->data_ptr<float>();
}

void paged_decode_attention(torch::Tensor& out, const torch::Tensor& query,
                            const torch::Tensor& kv_cache, const torch::Tensor& tables,
                            const torch::Tensor& context_lens, double scale,
                            int64_t sliding_window, double soft_cap,
                            const std::optional<torch::Tensor>& sinks) {
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
                              spec.int8_cache,
                              sink_logits(sinks, num_heads)};
  pybind11::gil_scoped_release no_gil;
  const protoserve::StepTimer timer(protoserve::StepRegion::kAttention);
  protoserve::paged_decode_attention(args);
}

void paged_prefill_attention(torch::Tensor& out, const torch::Tensor& query,
                             const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                             int64_t context_start, double scale, int64_t sliding_window,
                             double soft_cap, const std::optional<torch::Tensor>& sinks) {
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
                               static_cast<float>(soft_cap),
                               sink_logits(sinks, num_heads)};
  pybind11::gil_scoped_release no_gil;
  const protoserve::StepTimer timer(protoserve::StepRegion::kAttention);
  protoserve::paged_prefill_attention(args);
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
        "0 for none; sinks: None or float32 [num_heads])",
        pybind11::arg("out"), pybind11::arg("query"), pybind11::arg("kv_cache"),
        pybind11::arg("tables"), pybind11::arg("context_lens"), pybind11::arg("scale"),
        pybind11::arg("sliding_window") = 0, pybind11::arg("soft_cap") = 0.0,
        pybind11::arg("sinks") = pybind11::none());
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "Causal attention of one sequence's query chunk over its paged context",
        pybind11::arg("out"), pybind11::arg("query"), pybind11::arg("kv_cache"),
        pybind11::arg("block_table"), pybind11::arg("context_start"), pybind11::arg("scale"),
        pybind11::arg("sliding_window") = 0, pybind11::arg("soft_cap") = 0.0,
        pybind11::arg("sinks") = pybind11::none());
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
  protoserve::register_decode_ops(m);  // pointwise ops, moe_route, decode_layers_bf16
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
