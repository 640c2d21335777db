// paged_decode_attention on CUDA: one query token per sequence over its paged context.
//
// Grid: x = kv head * head tiles, y = sequence, z = context partition. A thread block of
// kWarps warps serves GT query heads that share one kv head, over one partition of
// kDecodePartitionTokens tokens, so each K/V row is read once per head tile:
//
//   warp w takes tokens begin + w, begin + w + kWarps, ...;
//   lane l holds dims d = l + 32 i (i < VEC) of q, k, v and of its running output;
//   per token: s = warp_sum(q . k) * scale, then an online-softmax update per head
//     m' = max(m, s),  l' = l e^(m - m') + e^(s - m'),  acc' = acc e^(m - m') + e^(s - m') v
//
// The warps' (m, l, acc) are merged through shared memory. A sequence with one partition
// writes acc / l; otherwise each partition stores (acc, m, l) and merge_partitions combines:
//
//   M = max_j m_j,  out = sum_j e^(m_j - M) acc_j / sum_j e^(m_j - M) l_j
#include <cstdint>

#include "dtypes.cuh"
#include "paged_ops.h"

namespace protoserve::cuda {
namespace {

constexpr int kWarps = 4;

__device__ __forceinline__ int64_t block_id(const DecodeParams& p, int64_t seq, int64_t index) {
  const int64_t offset = seq * p.block_table_stride + index;
  return p.block_tables_int32 ? static_cast<const int32_t*>(p.block_tables)[offset]
                              : static_cast<const int64_t*>(p.block_tables)[offset];
}

__device__ __forceinline__ int64_t num_parts_of(int64_t context_len) {
  return (context_len + kDecodePartitionTokens - 1) / kDecodePartitionTokens;
}

template <typename T, int VEC, int GT>
__global__ void __launch_bounds__(kWarps * 32) decode_kernel(DecodeParams p) {
  const int64_t head_dim = p.cache.head_dim;
  const int64_t group = p.num_heads / p.cache.num_kv_heads;
  const int64_t tiles = group / GT;
  const int64_t kv_head = blockIdx.x / tiles;
  const int64_t head0 = kv_head * group + (blockIdx.x % tiles) * GT;
  const int64_t seq = blockIdx.y;
  const int64_t part = blockIdx.z;
  const int64_t context_len = p.context_lens[seq];
  const int64_t begin = part * kDecodePartitionTokens;
  if (begin >= context_len) return;  // this sequence has fewer partitions
  const int64_t end = min(context_len, begin + kDecodePartitionTokens);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  float q[GT][VEC], acc[GT][VEC], m[GT], l[GT];
  const T* query = static_cast<const T*>(p.query.data) + seq * p.query.token_stride;
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t d = lane + 32 * i;
      q[g][i] = d < head_dim ? to_float(query[(head0 + g) * p.query.head_stride + d]) : 0.0f;
      acc[g][i] = 0.0f;
    }
  }

  const int64_t row_elements = p.cache.num_kv_heads * head_dim;
  const int64_t value_offset = p.cache.num_blocks * p.cache.block_size * row_elements;
  const T* cache = static_cast<const T*>(p.cache.data);
  for (int64_t t = begin + warp; t < end; t += kWarps) {
    const int64_t slot = block_id(p, seq, t / p.cache.block_size) * p.cache.block_size +
                         t % p.cache.block_size;
    const T* key = cache + slot * row_elements + kv_head * head_dim;
    const T* value = key + value_offset;
    float k[VEC], v[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t d = lane + 32 * i;
      k[i] = d < head_dim ? to_float(key[d]) : 0.0f;
      v[i] = d < head_dim ? to_float(value[d]) : 0.0f;
    }
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) dot += q[g][i] * k[i];
      const float s = warp_sum(dot) * p.scale;
      const float m_new = fmaxf(m[g], s);
      const float alpha = __expf(m[g] - m_new);  // 0 on the first token (m = -inf)
      const float weight = __expf(s - m_new);
      l[g] = l[g] * alpha + weight;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] = acc[g][i] * alpha + weight * v[i];
      m[g] = m_new;
    }
  }

  // Merge the warps. A warp that saw no token has m = -inf and contributes e^(-inf) = 0.
  __shared__ float shared_m[kWarps][GT];
  __shared__ float shared_l[kWarps][GT];
  __shared__ float shared_acc[kWarps][GT][VEC * 32];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    if (lane == 0) {
      shared_m[warp][g] = m[g];
      shared_l[warp][g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) shared_acc[warp][g][lane + 32 * i] = acc[g][i];
  }
  __syncthreads();

  const bool split = num_parts_of(context_len) > 1;
  for (int64_t index = threadIdx.x; index < GT * head_dim; index += blockDim.x) {
    const int g = static_cast<int>(index / head_dim);
    const int64_t d = index % head_dim;
    float m_max = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m_max = fmaxf(m_max, shared_m[w][g]);
    float total = 0.0f, out = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float weight = __expf(shared_m[w][g] - m_max);
      total += weight * shared_l[w][g];
      out += weight * shared_acc[w][g][d];
    }
    const int64_t head = head0 + g;
    if (!split) {
      T* row = static_cast<T*>(p.out.data) + seq * p.out.token_stride + head * p.out.head_stride;
      row[d] = from_float<T>(out / total);
      continue;
    }
    const int64_t at = (seq * p.num_heads + head) * p.max_parts + part;
    p.partial_out[at * head_dim + d] = out;
    if (d == 0) {
      p.partial_max[at] = m_max;
      p.partial_sum[at] = total;
    }
  }
}

// One thread block per (query head, sequence) of the split sequences.
template <typename T>
__global__ void merge_partitions(DecodeParams p) {
  const int64_t head = blockIdx.x;
  const int64_t seq = blockIdx.y;
  const int64_t num_parts = num_parts_of(p.context_lens[seq]);
  if (num_parts <= 1) return;  // written directly by decode_kernel
  const int64_t base = (seq * p.num_heads + head) * p.max_parts;
  float m_max = -INFINITY;
  for (int64_t j = 0; j < num_parts; ++j) m_max = fmaxf(m_max, p.partial_max[base + j]);
  float total = 0.0f;
  for (int64_t j = 0; j < num_parts; ++j)
    total += __expf(p.partial_max[base + j] - m_max) * p.partial_sum[base + j];
  const int64_t head_dim = p.cache.head_dim;
  T* row = static_cast<T*>(p.out.data) + seq * p.out.token_stride + head * p.out.head_stride;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float out = 0.0f;
    for (int64_t j = 0; j < num_parts; ++j)
      out += __expf(p.partial_max[base + j] - m_max) * p.partial_out[(base + j) * head_dim + d];
    row[d] = from_float<T>(out / total);
  }
}

template <typename T, int VEC, int GT>
cudaError_t launch_typed(const DecodeParams& p, cudaStream_t stream) {
  const int64_t group = p.num_heads / p.cache.num_kv_heads;
  const dim3 grid(static_cast<unsigned>(p.cache.num_kv_heads * (group / GT)),
                  static_cast<unsigned>(p.num_seqs), static_cast<unsigned>(p.max_parts));
  decode_kernel<T, VEC, GT><<<grid, kWarps * 32, 0, stream>>>(p);
  if (p.max_parts > 1) {
    const dim3 merge_grid(static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.num_seqs));
    merge_partitions<T><<<merge_grid, 128, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// head_dim -> values per lane (VEC), query-head group -> heads per thread block (GT).
template <typename T, int VEC>
cudaError_t launch_vec(const DecodeParams& p, cudaStream_t stream) {
  const int64_t group = p.num_heads / p.cache.num_kv_heads;
  if (group % 8 == 0) return launch_typed<T, VEC, 8>(p, stream);
  if (group % 4 == 0) return launch_typed<T, VEC, 4>(p, stream);
  if (group % 2 == 0) return launch_typed<T, VEC, 2>(p, stream);
  return launch_typed<T, VEC, 1>(p, stream);
}

template <typename T>
cudaError_t launch_dtype(const DecodeParams& p, cudaStream_t stream) {
  if (p.cache.head_dim <= 64) return launch_vec<T, 2>(p, stream);
  if (p.cache.head_dim <= 128) return launch_vec<T, 4>(p, stream);
  return launch_vec<T, 8>(p, stream);
}

}  // namespace

cudaError_t launch_paged_decode_attention(const DecodeParams& params, cudaStream_t stream) {
  if (params.num_seqs == 0) return cudaSuccess;
  if (params.cache.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat32: return launch_dtype<float>(params, stream);
    case DType::kFloat16: return launch_dtype<__half>(params, stream);
    default: return launch_dtype<__nv_bfloat16>(params, stream);
  }
}

}  // namespace protoserve::cuda
