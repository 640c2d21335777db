// Python bindings of the CUDA ops: tensor checks, the current stream and the partition
// workspace here; the kernels behind the plain launcher API of paged_ops.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <array>
#include <atomic>

#include "paged_ops.h"

namespace {

namespace pc = protoserve::cuda;

pc::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return pc::DType::kFloat32;
    case torch::kFloat16: return pc::DType::kFloat16;
    case torch::kBFloat16: return pc::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "kv_cache must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

pc::CacheView cache_view(const torch::Tensor& kv_cache) {
  TORCH_CHECK(kv_cache.is_cuda(), "kv_cache must be a CUDA tensor");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  return {kv_cache.data_ptr(), kv_cache.size(1), kv_cache.size(2), kv_cache.size(3),
          kv_cache.size(4)};
}

pc::RowsView rows_view(const torch::Tensor& t, const char* name, const torch::Tensor& kv_cache,
                       int64_t heads) {
  TORCH_CHECK(t.device() == kv_cache.device(), name, " must be on the cache's device");
  TORCH_CHECK(t.scalar_type() == kv_cache.scalar_type(), name, " dtype differs from the cache's");
  TORCH_CHECK(t.dim() == 3 && t.size(1) == heads && t.size(2) == kv_cache.size(4), name,
              " must be [tokens, ", heads, ", ", kv_cache.size(4), "], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, name, " needs a contiguous last dim");
  return {t.data_ptr(), t.stride(0), t.stride(1)};
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

void write_kv_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
                    const torch::Tensor& slot_mapping) {
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const pc::CacheView cache = cache_view(kv_cache);
  TORCH_CHECK(slot_mapping.device() == kv_cache.device() &&
                  slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1 &&
                  slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous 1-D int64 tensor on the cache's device");
  const int64_t num_tokens = slot_mapping.size(0);
  TORCH_CHECK(key.size(0) == num_tokens && value.size(0) == num_tokens,
              "key/value rows must match slot_mapping");
  const pc::WriteKvParams params{dtype_of(kv_cache),
                                 rows_view(key, "key", kv_cache, cache.num_kv_heads),
                                 rows_view(value, "value", kv_cache, cache.num_kv_heads),
                                 num_tokens,
                                 cache,
                                 slot_mapping.data_ptr<int64_t>()};
  check_launch(pc::launch_write_kv_cache(params, c10::cuda::getCurrentCUDAStream()),
               "write_kv_cache");
}

// Of the current device; read once per device (the attribute query is cheap, but not free).
int64_t multiprocessor_count() {
  static std::array<std::atomic<int>, 64> cached{};
  int device = 0;
  check_launch(cudaGetDevice(&device), "cudaGetDevice");
  if (device < 0 || device >= static_cast<int>(cached.size())) device = 0;
  int count = cached[device].load(std::memory_order_relaxed);
  if (count == 0) {
    check_launch(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
                 "cudaDeviceGetAttribute");
    cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Halves the context partition (down to kMinDecodePartitionTokens) until the grid has about
// two thread blocks per multiprocessor: a batch of a few sequences otherwise leaves most of
// the GPU idle while a handful of blocks walk long partitions.
int64_t decode_partition_tokens(int64_t num_seqs, int64_t num_heads, const pc::CacheView& cache,
                                int64_t max_len) {
  const int64_t target_blocks = 2 * multiprocessor_count();
  // Thread blocks per partition, as the launcher tiles the heads: one per kv head and
  // sequence, times group / heads_per_block (heads_per_block: the largest of 8/4/2/1
  // dividing the group).
  const int64_t group = num_heads / cache.num_kv_heads;
  const int64_t heads_per_block = group % 8 == 0 ? 8 : group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
  const int64_t blocks_per_part = num_seqs * cache.num_kv_heads * (group / heads_per_block);
  int64_t tokens = pc::kDecodePartitionTokens;
  while (tokens > pc::kMinDecodePartitionTokens &&
         blocks_per_part * ((max_len + tokens - 1) / tokens) < target_blocks) {
    tokens /= 2;
  }
  return tokens;
}

void paged_decode_attention(torch::Tensor& out, const torch::Tensor& query,
                            const torch::Tensor& kv_cache, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens, double scale) {
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const pc::CacheView cache = cache_view(kv_cache);
  const int64_t num_seqs = query.size(0);
  const int64_t num_heads = query.size(1);
  TORCH_CHECK(num_heads % cache.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(cache.head_dim <= pc::kMaxHeadDim, "head_dim above ", pc::kMaxHeadDim);
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  TORCH_CHECK(block_tables.device() == kv_cache.device() && block_tables.dim() == 2 &&
                  block_tables.size(0) == num_seqs && block_tables.stride(1) == 1,
              "block_tables must be [num_seqs, max_blocks] on the cache's device");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 ||
                  block_tables.scalar_type() == torch::kInt64,
              "block_tables must be int32 or int64");
  const torch::Tensor lens = context_lens.to(kv_cache.device(), torch::kInt64).contiguous();
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == num_seqs, "context_lens must be [num_seqs]");
  // The table width bounds every context length, so the grid is sized without a host sync.
  const int64_t max_len = block_tables.size(1) * cache.block_size;
  const int64_t partition_tokens = decode_partition_tokens(num_seqs, num_heads, cache, max_len);
  const int64_t max_parts =
      std::max<int64_t>(1, (max_len + partition_tokens - 1) / partition_tokens);
  torch::Tensor partial_out, partial_stats;
  const auto options = query.options().dtype(torch::kFloat32);
  if (max_parts > 1) {
    partial_out = torch::empty({num_seqs, num_heads, max_parts, cache.head_dim}, options);
    partial_stats = torch::empty({2, num_seqs, num_heads, max_parts}, options);
  }
  const pc::DecodeParams params{
      dtype_of(kv_cache),
      rows_view(out, "out", kv_cache, num_heads),
      rows_view(query, "query", kv_cache, num_heads),
      cache,
      num_seqs,
      num_heads,
      block_tables.data_ptr(),
      block_tables.scalar_type() == torch::kInt32,
      block_tables.stride(0),
      lens.data_ptr<int64_t>(),
      static_cast<float>(scale),
      partition_tokens,
      max_parts,
      max_parts > 1 ? partial_out.data_ptr<float>() : nullptr,
      max_parts > 1 ? partial_stats[0].data_ptr<float>() : nullptr,
      max_parts > 1 ? partial_stats[1].data_ptr<float>() : nullptr,
  };
  check_launch(pc::launch_paged_decode_attention(params, c10::cuda::getCurrentCUDAStream()),
               "paged_decode_attention");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "protoserve paged KV-cache kernels (CUDA)";
  m.def("write_kv_cache", &write_kv_cache, "Scatter K/V rows into the paged cache");
  m.def("paged_decode_attention", &paged_decode_attention,
        "One-query attention per sequence over its paged context");
}
