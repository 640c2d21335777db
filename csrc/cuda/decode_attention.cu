// paged_decode_attention on CUDA: one query token per sequence over its paged context.
//
// Grid: x = kv head * head tiles, y = sequence, z = context partition. A thread block of
// kWarps warps serves GT query heads that share one kv head, over one partition of
// p.partition_tokens tokens, so each K/V row is read once per head tile. Two kernels:
//
// decode_kernel_vec (head_dim 64/128/256, 16-byte aligned cache): LPT lanes share one token,
//   each lane loading E = head_dim / LPT contiguous dims with 16-byte loads, so one warp
//   instruction reads 32 x 16 bytes of K (several tokens at once) and U iterations' loads are
//   issued before any is used (memory-level parallelism is what decode attention needs);
//   q . k is reduced over the LPT lanes of the token with xor-shuffles.
// decode_kernel (any head_dim <= kMaxHeadDim): one token per warp, lane l holds dims
//   d = l + 32 i; the fallback for the other shapes.
//
// Both keep a running online softmax per head and per token slot:
//     m' = max(m, s),  l' = l e^(m - m') + e^(s - m'),  acc' = acc e^(m - m') + e^(s - m') v
// The token slots of a warp merge through shuffles, the warps through shared memory. A
// sequence with one partition writes acc / l; otherwise each partition stores (acc, m, l) and
// merge_partitions combines:
//
//   M = max_j m_j,  out = sum_j e^(m_j - M) acc_j / sum_j e^(m_j - M) l_j
#include <cstdint>
#include <type_traits>

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

__device__ __forceinline__ int64_t num_parts_of(const DecodeParams& p, int64_t context_len) {
  return (context_len + p.partition_tokens - 1) / p.partition_tokens;
}

// e^(a - b) where a may be -inf for an empty accumulator (and b too when both are empty).
__device__ __forceinline__ float rescale(float a, float b) {
  return a == -INFINITY ? 0.0f : __expf(a - b);
}

// Combines the kWarps warps' (m, l, acc) held in shared memory and writes either the output
// row (one partition) or this partition's partials. Called by every thread of the block.
template <typename T, int GT, int kMaxDim>
__device__ __forceinline__ void finish_block(
    const DecodeParams& p, int64_t seq, int64_t part, int64_t head0, int64_t context_len,
    const float (&shared_m)[kWarps][GT], const float (&shared_l)[kWarps][GT],
    const float (&shared_acc)[kWarps][GT][kMaxDim]) {
  const int64_t head_dim = p.cache.head_dim;
  const bool split = num_parts_of(p, context_len) > 1;
  for (int64_t index = threadIdx.x; index < GT * head_dim; index += blockDim.x) {
    const int g = static_cast<int>(index / head_dim);
    const int64_t d = index % head_dim;
    float m_max = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m_max = fmaxf(m_max, shared_m[w][g]);
    float total = 0.0f, out = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float weight = rescale(shared_m[w][g], m_max);
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
  const int64_t begin = part * p.partition_tokens;
  if (begin >= context_len) return;  // this sequence has fewer partitions
  const int64_t end = min(context_len, begin + p.partition_tokens);
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
  finish_block<T, GT, VEC * 32>(p, seq, part, head0, context_len, shared_m, shared_l, shared_acc);
}

// Loads E contiguous elements (E * sizeof(T) a multiple of 16 bytes, 16-byte aligned) as
// 16-byte vectors and widens them to fp32.
template <typename T, int E>
__device__ __forceinline__ void load_dims(const T* source, float (&out)[E]) {
  constexpr int kPerVector = 16 / sizeof(T);
#pragma unroll
  for (int j = 0; j < E / kPerVector; ++j) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(source) + j);
    const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPerVector; ++i) out[j * kPerVector + i] = to_float(values[i]);
  }
}

template <typename T, int D, int GT>
__global__ void __launch_bounds__(kWarps * 32) decode_kernel_vec(DecodeParams p) {
  constexpr int kPerVector = 16 / sizeof(T);
  constexpr int LPT = D / kPerVector < 32 ? D / kPerVector : 32;  // lanes per token
  constexpr int E = D / LPT;                                       // dims per lane
  constexpr int TPI = 32 / LPT;                                    // tokens per warp step
  constexpr int U = 4;                                             // steps loaded at once
  constexpr int kBlockStep = kWarps * TPI;
  const int64_t group = p.num_heads / p.cache.num_kv_heads;
  const int64_t tiles = group / GT;
  const int64_t kv_head = blockIdx.x / tiles;
  const int64_t head0 = kv_head * group + (blockIdx.x % tiles) * GT;
  const int64_t seq = blockIdx.y;
  const int64_t part = blockIdx.z;
  const int64_t context_len = p.context_lens[seq];
  const int64_t begin = part * p.partition_tokens;
  if (begin >= context_len) return;  // this sequence has fewer partitions
  const int64_t end = min(context_len, begin + p.partition_tokens);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int slot_in_step = lane / LPT;  // which of the warp's TPI tokens this lane reads
  const int piece = lane % LPT;         // dims [piece * E, piece * E + E)

  // q is pre-scaled, so q . k is the logit.
  float q[GT][E], acc[GT][E], m[GT], l[GT];
  const T* query = static_cast<const T*>(p.query.data) + seq * p.query.token_stride;
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      q[g][i] = to_float(query[(head0 + g) * p.query.head_stride + piece * E + i]) * p.scale;
      acc[g][i] = 0.0f;
    }
  }

  const int64_t row_elements = p.cache.num_kv_heads * D;
  const int64_t value_offset = p.cache.num_blocks * p.cache.block_size * row_elements;
  const T* cache = static_cast<const T*>(p.cache.data) + kv_head * D + piece * E;
  // The loop bound is the warp's first token, the same for all its lanes: every lane runs
  // every shuffle. Lanes past the end load nothing and skip the update.
  for (int64_t step = begin + warp * TPI; step < end; step += kBlockStep * U) {
    float k[U][E], v[U][E];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = step + u * kBlockStep + slot_in_step;
      valid[u] = t < end;
      if (valid[u]) {
        const int64_t slot = block_id(p, seq, t / p.cache.block_size) * p.cache.block_size +
                             t % p.cache.block_size;
        const T* key = cache + slot * row_elements;
        load_dims<T, E>(key, k[u]);
        load_dims<T, E>(key + value_offset, v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float s = 0.0f;
        if (valid[u]) {
#pragma unroll
          for (int i = 0; i < E; ++i) s += q[g][i] * k[u][i];
        }
#pragma unroll
        for (int offset = LPT / 2; offset > 0; offset >>= 1)
          s += __shfl_xor_sync(0xffffffffu, s, offset);
        if (!valid[u]) continue;
        const float m_new = fmaxf(m[g], s);
        const float alpha = rescale(m[g], m_new);
        const float weight = __expf(s - m_new);
        l[g] = l[g] * alpha + weight;
#pragma unroll
        for (int i = 0; i < E; ++i) acc[g][i] = acc[g][i] * alpha + weight * v[u][i];
        m[g] = m_new;
      }
    }
  }

  // Merge the warp's TPI token slots (lanes piece, piece + LPT, ... hold the same dims).
#pragma unroll
  for (int offset = LPT; offset < 32; offset <<= 1) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[g], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[g], offset);
      const float m_new = fmaxf(m[g], m_other);
      const float mine = rescale(m[g], m_new), theirs = rescale(m_other, m_new);
      l[g] = l[g] * mine + l_other * theirs;
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const float acc_other = __shfl_xor_sync(0xffffffffu, acc[g][i], offset);
        acc[g][i] = acc[g][i] * mine + acc_other * theirs;
      }
      m[g] = m_new;
    }
  }

  __shared__ float shared_m[kWarps][GT];
  __shared__ float shared_l[kWarps][GT];
  __shared__ float shared_acc[kWarps][GT][D];
  if (lane < LPT) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      if (lane == 0) {
        shared_m[warp][g] = m[g];
        shared_l[warp][g] = l[g];
      }
#pragma unroll
      for (int i = 0; i < E; ++i) shared_acc[warp][g][piece * E + i] = acc[g][i];
    }
  }
  __syncthreads();
  finish_block<T, GT, D>(p, seq, part, head0, context_len, shared_m, shared_l, shared_acc);
}

// One thread block per (query head, sequence) of the split sequences.
template <typename T>
__global__ void merge_partitions(DecodeParams p) {
  const int64_t head = blockIdx.x;
  const int64_t seq = blockIdx.y;
  const int64_t num_parts = num_parts_of(p, p.context_lens[seq]);
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

template <typename T>
void launch_merge_partitions(const DecodeParams& p, cudaStream_t stream) {
  if (p.max_parts <= 1) return;
  const dim3 merge_grid(static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.num_seqs));
  merge_partitions<T><<<merge_grid, 128, 0, stream>>>(p);
}

dim3 decode_grid(const DecodeParams& p, int64_t heads_per_block) {
  const int64_t group = p.num_heads / p.cache.num_kv_heads;
  return dim3(static_cast<unsigned>(p.cache.num_kv_heads * (group / heads_per_block)),
              static_cast<unsigned>(p.num_seqs), static_cast<unsigned>(p.max_parts));
}

// Query heads per thread block: the largest of 8/4/2/1 dividing the group.
template <typename Launch>
cudaError_t with_heads_per_block(const DecodeParams& p, Launch&& launch) {
  const int64_t group = p.num_heads / p.cache.num_kv_heads;
  if (group % 8 == 0) return launch(std::integral_constant<int, 8>{});
  if (group % 4 == 0) return launch(std::integral_constant<int, 4>{});
  if (group % 2 == 0) return launch(std::integral_constant<int, 2>{});
  return launch(std::integral_constant<int, 1>{});
}

template <typename T, int VEC>
cudaError_t launch_generic(const DecodeParams& p, cudaStream_t stream) {
  return with_heads_per_block(p, [&](auto heads) {
    constexpr int GT = decltype(heads)::value;
    decode_kernel<T, VEC, GT><<<decode_grid(p, GT), kWarps * 32, 0, stream>>>(p);
    launch_merge_partitions<T>(p, stream);
    return cudaGetLastError();
  });
}

template <typename T, int D>
cudaError_t launch_vec(const DecodeParams& p, cudaStream_t stream) {
  return with_heads_per_block(p, [&](auto heads) {
    constexpr int GT = decltype(heads)::value;
    decode_kernel_vec<T, D, GT><<<decode_grid(p, GT), kWarps * 32, 0, stream>>>(p);
    launch_merge_partitions<T>(p, stream);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_dtype(const DecodeParams& p, cudaStream_t stream) {
  // The vectorised kernel reads 16-byte vectors: the cache must start on a 16-byte boundary
  // (rows then do too, as head_dim is a multiple of the vector width).
  const bool aligned = reinterpret_cast<uintptr_t>(p.cache.data) % 16 == 0;
  if (aligned && p.cache.head_dim == 64) return launch_vec<T, 64>(p, stream);
  if (aligned && p.cache.head_dim == 128) return launch_vec<T, 128>(p, stream);
  if (aligned && p.cache.head_dim == 256) return launch_vec<T, 256>(p, stream);
  if (p.cache.head_dim <= 64) return launch_generic<T, 2>(p, stream);
  if (p.cache.head_dim <= 128) return launch_generic<T, 4>(p, stream);
  return launch_generic<T, 8>(p, stream);
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
