// Launcher API of the CUDA paged-cache kernels: raw device pointers, element strides and
// shapes only, so the .cu files never include torch headers (bindings.cpp does the tensor
// side) and compile on their own with nvcc.
//
// Cache layout, one layer: kv[2, num_blocks, block_size, num_kv_heads, head_dim], contiguous;
// token position p of a sequence lives in block block_table[p / block_size], slot
// p % block_size.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace protoserve::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct CacheView {
  void* data;
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_kv_heads;
  int64_t head_dim;
};

// [tokens, heads, head_dim] rows with a contiguous last dim.
struct RowsView {
  void* data;
  int64_t token_stride;
  int64_t head_stride;
};

struct WriteKvParams {
  DType dtype;
  RowsView key;
  RowsView value;
  int64_t num_tokens;
  CacheView cache;
  const int64_t* slot_mapping;  // [num_tokens]; a negative slot is a padding row (skipped)
};

struct DecodeParams {
  DType dtype;
  RowsView out;    // [num_seqs, num_heads, head_dim]
  RowsView query;  // [num_seqs, num_heads, head_dim]
  CacheView cache;
  int64_t num_seqs;
  int64_t num_heads;
  const void* block_tables;  // [num_seqs, block_table_stride] int32 or int64
  bool block_tables_int32;
  int64_t block_table_stride;
  const int64_t* context_lens;  // [num_seqs], each >= 1
  float scale;
  // Context partitions (flash-decoding): a sequence longer than one partition writes
  // unnormalised partials here, then a merge kernel combines them. Sized for max_parts.
  // partition_tokens is a power of two <= kDecodePartitionTokens, chosen by the caller so
  // that short, narrow batches still spread over every multiprocessor.
  int64_t partition_tokens;
  int64_t max_parts;
  float* partial_out;  // [num_seqs, num_heads, max_parts, head_dim]
  float* partial_max;  // [num_seqs, num_heads, max_parts]
  float* partial_sum;  // [num_seqs, num_heads, max_parts]
};

// Most tokens per context partition of the decode kernel (and the fewest, below which the
// merge costs more than the parallelism gains).
constexpr int64_t kDecodePartitionTokens = 512;
constexpr int64_t kMinDecodePartitionTokens = 64;
// Largest head_dim the decode kernel supports.
constexpr int64_t kMaxHeadDim = 256;

cudaError_t launch_write_kv_cache(const WriteKvParams& params, cudaStream_t stream);
cudaError_t launch_paged_decode_attention(const DecodeParams& params, cudaStream_t stream);

}  // namespace protoserve::cuda
