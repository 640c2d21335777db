// paged_decode_attention: one query token per sequence over its paged context.
//
// Work units are (sequence, kv head, context partition). A partition is kPartitionTokens
// tokens (a whole number of blocks), so a long context at batch 1 still splits into enough
// units to keep every thread busy (flash-decoding):
//
//   context of sequence s:  [ part 0 | part 1 | ... | part P-1 ]      P = ceil(len / part_len)
//   units:                  unit_begin[s] + kv_head * P + part
//
// A sequence with one partition writes its output directly. Otherwise every partition stores
// (m, l, acc) and a second pass merges them:
//
//   M = max_j m_j,   out = sum_j exp(m_j - M) * acc_j  /  sum_j exp(m_j - M) * l_j
//
// The partition length does not depend on the thread count, so results are reproducible.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "decode_kernels.h"

namespace protoserve {
namespace {

constexpr int64_t kPartitionTokens = 512;

template <typename T>
void prefetch_block(const T* keys, const T* values, int64_t stride, int64_t n, int64_t dim) {
  // Each token's row of this head is dim contiguous elements; the rows of a block sit
  // `stride` apart, and consecutive blocks anywhere in the cache, so hardware prefetchers
  // cannot see the next block coming.
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t offset = 0; offset < row_bytes; offset += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(keys + t * stride) + offset, 0, 3);
      __builtin_prefetch(reinterpret_cast<const char*>(values + t * stride) + offset, 0, 3);
    }
}

template <typename T, typename Kernel>
void run_decode(const DecodeArgs& args) {
  const CacheShape& shape = args.cache;
  const PagedCache<T> cache{static_cast<const T*>(args.kv_cache), shape.num_blocks,
                            shape.block_size, shape.num_kv_heads, shape.head_dim};
  const int64_t group = args.num_heads / shape.num_kv_heads;
  const int64_t dim = shape.head_dim;
  const int64_t block_size = shape.block_size;
  const int64_t part_len = std::max(block_size, round_up(kPartitionTokens, block_size));

  std::vector<int64_t> num_parts(args.num_seqs);
  std::vector<int64_t> unit_begin(args.num_seqs + 1, 0);
  bool any_split = false;
  for (int64_t s = 0; s < args.num_seqs; ++s) {
    num_parts[s] = ceil_div(args.context_lens[s], part_len);
    any_split |= num_parts[s] > 1;
    unit_begin[s + 1] = unit_begin[s] + shape.num_kv_heads * num_parts[s];
  }
  const int64_t num_units = unit_begin[args.num_seqs];
  const int64_t dim_pad = round_up(dim, 32);
  // Per split unit: [group][dim_pad] acc, then [group] m and [group] l.
  const int64_t partial_stride = group * (dim_pad + 2);
  std::vector<float> partials(any_split ? num_units * partial_stride : 0);

  T* out = static_cast<T*>(args.out.data);
  const T* query = static_cast<const T*>(args.query.data);
  for_each_unit(
      num_units,
      [&] {
        return std::make_pair(DecodeState(group, dim, block_size),
                              std::vector<float>(group * dim_pad));
      },
      [&](int64_t unit, auto& worker) {
        DecodeState& st = worker.first;
        float* natural = worker.second.data();
        const int64_t s =
            std::upper_bound(unit_begin.begin(), unit_begin.end(), unit) - unit_begin.begin() - 1;
        const int64_t local = unit - unit_begin[s];
        const int64_t kv_head = local / num_parts[s];
        const int64_t part = local % num_parts[s];
        const int64_t begin = part * part_len;
        const int64_t end = std::min(args.context_lens[s], begin + part_len);

        st.reset();
        Kernel::load_query(st, query + s * args.query.token_stride + kv_head * group * args.query.head_stride,
                           args.query.head_stride);
        for (int64_t block_index = begin / block_size; block_index * block_size < end; ++block_index) {
          const int64_t block = args.block_tables.at(s, block_index);
          const int64_t n = std::min(block_size, end - block_index * block_size);
          if ((block_index + 1) * block_size < end) {
            const int64_t next = args.block_tables.at(s, block_index + 1);
            prefetch_block(cache.key_row(next, 0, kv_head), cache.value_row(next, 0, kv_head),
                           cache.token_stride(), std::min(block_size, end - (block_index + 1) * block_size),
                           dim);
          }
          Kernel::attend_block(st, cache.key_row(block, 0, kv_head), cache.value_row(block, 0, kv_head),
                               cache.token_stride(), n, args.scale);
        }
        Kernel::finish(st, natural);

        if (num_parts[s] == 1) {
          for (int64_t g = 0; g < group; ++g) {
            T* row = out + s * args.out.token_stride + (kv_head * group + g) * args.out.head_stride;
            const float inv = 1.0f / st.l[g];
            for (int64_t d = 0; d < dim; ++d) row[d] = from_float<T>(natural[g * dim_pad + d] * inv);
          }
          return;
        }
        float* partial = partials.data() + unit * partial_stride;
        std::copy(natural, natural + group * dim_pad, partial);
        std::copy(st.m.begin(), st.m.end(), partial + group * dim_pad);
        std::copy(st.l.begin(), st.l.end(), partial + group * dim_pad + group);
      });
  if (!any_split) return;

  // Merge: one task per (sequence, query head) of the split sequences.
  at::parallel_for(0, args.num_seqs * args.num_heads, 16, [&](int64_t first, int64_t last) {
    std::vector<float> merged(dim);
    for (int64_t task = first; task < last; ++task) {
      const int64_t s = task / args.num_heads;
      if (num_parts[s] == 1) continue;
      const int64_t head = task % args.num_heads;
      const int64_t kv_head = head / group;
      const int64_t g = head % group;
      const float* base = partials.data() + (unit_begin[s] + kv_head * num_parts[s]) * partial_stride;
      auto m_of = [&](int64_t j) { return base[j * partial_stride + group * dim_pad + g]; };
      float m_max = -INFINITY;
      for (int64_t j = 0; j < num_parts[s]; ++j) m_max = std::max(m_max, m_of(j));
      std::fill(merged.begin(), merged.end(), 0.0f);
      float total = 0.0f;
      for (int64_t j = 0; j < num_parts[s]; ++j) {
        const float* acc = base + j * partial_stride + g * dim_pad;
        const float weight = std::exp(m_of(j) - m_max);
        total += weight * base[j * partial_stride + group * dim_pad + group + g];
        for (int64_t d = 0; d < dim; ++d) merged[d] += weight * acc[d];
      }
      T* row = out + s * args.out.token_stride + head * args.out.head_stride;
      for (int64_t d = 0; d < dim; ++d) row[d] = from_float<T>(merged[d] / total);
    }
  });
}

}  // namespace

void paged_decode_attention(const DecodeArgs& args) {
  if (args.kind == ScalarKind::kFloat32) {
    run_decode<float, PortableDecode<float>>(args);
    return;
  }
#if PROTOSERVE_AVX512_BF16
  run_decode<bf16_t, Avx512Bf16Decode>(args);
#else
  run_decode<bf16_t, PortableDecode<bf16_t>>(args);
#endif
}

}  // namespace protoserve
