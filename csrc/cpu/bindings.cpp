// Python bindings of the CPU ops: tensor checks, then raw pointers into the kernels.
// Every op writes into tensors the caller allocated and releases the GIL while it runs.
#include <torch/extension.h>

#include <vector>

#include "cpu_ops.h"

namespace {

using protoserve::BlockTables;
using protoserve::CacheShape;
using protoserve::RowsView;
using protoserve::ScalarKind;

ScalarKind kind_of(const torch::Tensor& kv_cache) {
  if (kv_cache.scalar_type() == torch::kFloat32) return ScalarKind::kFloat32;
  TORCH_CHECK(kv_cache.scalar_type() == torch::kBFloat16,
              "kv_cache must be float32 or bfloat16, got ", kv_cache.scalar_type());
  return ScalarKind::kBFloat16;
}

CacheShape cache_shape(const torch::Tensor& kv_cache) {
  TORCH_CHECK(kv_cache.device().is_cpu(), "kv_cache must be a CPU tensor");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  return {kv_cache.size(1), kv_cache.size(2), kv_cache.size(3), kv_cache.size(4)};
}

// [tokens, heads, head_dim] with a contiguous last dim, same dtype as the cache.
RowsView rows_view(const torch::Tensor& t, const char* name, const torch::Tensor& kv_cache,
                   int64_t heads) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == kv_cache.scalar_type(), name, " dtype ", t.scalar_type(),
              " differs from the cache's ", kv_cache.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(1) == heads && t.size(2) == kv_cache.size(4), name,
              " must be [tokens, ", heads, ", ", kv_cache.size(4), "], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, name, " needs a contiguous last dim");
  return {t.data_ptr(), t.stride(0), t.stride(1)};
}

BlockTables block_tables(const torch::Tensor& tables, int64_t num_blocks, int64_t num_rows,
                         const std::vector<int64_t>& blocks_needed) {
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
    for (int64_t i = 0; i < blocks_needed[row]; ++i) {
      const int64_t block = view.at(row, i);
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id ", block, " out of range");
    }
  }
  return view;
}

void write_kv_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
                    const torch::Tensor& slot_mapping) {
  const CacheShape shape = cache_shape(kv_cache);
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == torch::kInt64 &&
                  slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous 1-D int64 CPU tensor");
  const int64_t num_tokens = slot_mapping.size(0);
  TORCH_CHECK(key.size(0) == num_tokens && value.size(0) == num_tokens,
              "key/value rows must match slot_mapping");
  const int64_t num_slots = shape.num_blocks * shape.block_size;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(slots[t] < num_slots, "slot ", slots[t], " out of range (", num_slots, " slots)");
  protoserve::WriteKvArgs args{kind_of(kv_cache),
                               rows_view(key, "key", kv_cache, shape.num_kv_heads),
                               rows_view(value, "value", kv_cache, shape.num_kv_heads),
                               num_tokens,
                               kv_cache.data_ptr(),
                               shape,
                               slots};
  pybind11::gil_scoped_release no_gil;
  protoserve::write_kv_cache(args);
}

void paged_decode_attention(torch::Tensor& out, const torch::Tensor& query,
                            const torch::Tensor& kv_cache, const torch::Tensor& tables,
                            const torch::Tensor& context_lens, double scale) {
  const CacheShape shape = cache_shape(kv_cache);
  const int64_t num_seqs = query.size(0);
  const int64_t num_heads = query.size(1);
  TORCH_CHECK(num_heads % shape.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  const torch::Tensor lens = context_lens.to(torch::kCPU, torch::kInt64).contiguous();
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == num_seqs, "context_lens must be [num_seqs]");
  std::vector<int64_t> blocks_needed(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = lens.data_ptr<int64_t>()[s];
    TORCH_CHECK(len >= 1, "context lengths must be >= 1");
    blocks_needed[s] = (len + shape.block_size - 1) / shape.block_size;
  }
  protoserve::DecodeArgs args{kind_of(kv_cache),
                              rows_view(out, "out", kv_cache, num_heads),
                              rows_view(query, "query", kv_cache, num_heads),
                              kv_cache.data_ptr(),
                              shape,
                              num_seqs,
                              num_heads,
                              block_tables(tables, shape.num_blocks, num_seqs, blocks_needed),
                              lens.data_ptr<int64_t>(),
                              static_cast<float>(scale)};
  pybind11::gil_scoped_release no_gil;
  protoserve::paged_decode_attention(args);
}

void paged_prefill_attention(torch::Tensor& out, const torch::Tensor& query,
                             const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                             int64_t context_start, double scale) {
  const CacheShape shape = cache_shape(kv_cache);
  const int64_t num_query_tokens = query.size(0);
  const int64_t num_heads = query.size(1);
  TORCH_CHECK(num_heads % shape.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  TORCH_CHECK(context_start >= 0, "context_start must be >= 0");
  TORCH_CHECK(block_table.dim() == 1, "block_table must be 1-D");
  const int64_t context_len = context_start + num_query_tokens;
  const std::vector<int64_t> blocks_needed{(context_len + shape.block_size - 1) / shape.block_size};
  protoserve::PrefillArgs args{kind_of(kv_cache),
                               rows_view(out, "out", kv_cache, num_heads),
                               rows_view(query, "query", kv_cache, num_heads),
                               kv_cache.data_ptr(),
                               shape,
                               num_heads,
                               block_tables(block_table.unsqueeze(0), shape.num_blocks, 1,
                                            blocks_needed),
                               context_start,
                               num_query_tokens,
                               static_cast<float>(scale)};
  pybind11::gil_scoped_release no_gil;
  protoserve::paged_prefill_attention(args);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "protoserve paged KV-cache kernels (CPU)";
  m.def("write_kv_cache", &write_kv_cache, "Scatter K/V rows into the paged cache");
  m.def("paged_decode_attention", &paged_decode_attention,
        "One-query attention per sequence over its paged context");
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "Causal attention of one sequence's query chunk over its paged context");
  m.def("has_avx512_bf16", &protoserve::has_avx512_bf16,
        "Whether bfloat16 runs on the AVX512_BF16 kernels");
}
