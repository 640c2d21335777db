// paged_decode_attention: one query token per sequence over its paged context.
//
// Work units are (sequence, context partition), all heads at once: a block's K rows for all
// kv heads are one contiguous run of block_size * num_kv_heads * head_dim elements, so a unit
// streams whole blocks (the prefetchers' favourite pattern) instead of one head's 256-byte
// slices at a 2 KiB stride. A partition is kPartitionTokens tokens (a whole number of
// blocks), so a long context at batch 1 still yields enough units to keep every thread busy
// (flash-decoding):
//
//   context of sequence s:  [ part 0 | part 1 | ... | part P-1 ]      P = ceil(len / part_len)
//   units:                  unit_begin[s] + part
//
// A sequence with one partition writes its output directly. Otherwise every partition stores
// (m, l, acc) per head and a second pass merges them:
//
//   M = max_j m_j,   out = sum_j exp(m_j - M) * acc_j  /  sum_j exp(m_j - M) * l_j
//
// The partition length does not depend on the thread count, so results are reproducible.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "cpu_ops.h"
#include "decode_avx512.h"

namespace protoserve {
namespace {

constexpr int64_t kPartitionTokens = 256;
// Blocks between the one being read and the one being prefetched.
constexpr int64_t kPrefetchDistance = 2;

void prefetch_range(const void* start, int64_t bytes) {
  const char* bytes_ptr = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64)
    __builtin_prefetch(bytes_ptr + offset, 0, 3);
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
  const int64_t stride = cache.token_stride();

  std::vector<int64_t> num_parts(args.num_seqs);
  std::vector<int64_t> unit_begin(args.num_seqs + 1, 0);
  bool any_split = false;
  for (int64_t s = 0; s < args.num_seqs; ++s) {
    num_parts[s] = ceil_div(args.context_lens[s], part_len);
    any_split |= num_parts[s] > 1;
    unit_begin[s + 1] = unit_begin[s] + num_parts[s];
  }
  const int64_t num_units = unit_begin[args.num_seqs];
  const int64_t dim_pad = round_up(dim, 32);
  // Per split unit: [num_heads][dim_pad] acc, then [num_heads] m and [num_heads] l.
  const int64_t partial_stride = args.num_heads * (dim_pad + 2);
  // Every slot is written before it is read: no zero-fill (megabytes at large batch).
  std::unique_ptr<float[]> partials(any_split ? new float[num_units * partial_stride] : nullptr);

  T* out = static_cast<T*>(args.out.data);
  const T* query = static_cast<const T*>(args.query.data);
  for_each_unit(
      num_units,
      [&] {
        return std::make_pair(DecodeState(args.num_heads, dim, part_len),
                              std::vector<float>(args.num_heads * dim_pad));
      },
      [&](int64_t unit, auto& worker) {
        DecodeState& st = worker.first;
        float* natural = worker.second.data();
        const int64_t s =
            std::upper_bound(unit_begin.begin(), unit_begin.end(), unit) - unit_begin.begin() - 1;
        const int64_t part = unit - unit_begin[s];
        const int64_t begin = part * part_len;
        const int64_t end = std::min(args.context_lens[s], begin + part_len);
        const int64_t first_block = begin / block_size;
        const int64_t end_block = ceil_div(end, block_size);
        auto block_at = [&](int64_t index) { return args.block_tables.at(s, index); };
        auto tokens_in = [&](int64_t index) {
          return std::min(block_size, end - index * block_size);
        };
        auto prefetch = [&](int64_t index, int64_t kv) {
          if (index >= end_block) return;
          const T* rows = kv == 0 ? cache.key_row(block_at(index), 0, 0)
                                  : cache.value_row(block_at(index), 0, 0);
          prefetch_range(rows, tokens_in(index) * stride * static_cast<int64_t>(sizeof(T)));
        };

        Kernel::load_query(st, query + s * args.query.token_stride, args.query.head_stride);
        for (int64_t index = first_block; index < end_block; ++index) {
          prefetch(index + kPrefetchDistance, 0);
          const int64_t block = block_at(index);
          for (int64_t kv_head = 0; kv_head < shape.num_kv_heads; ++kv_head)
            Kernel::scores(st, kv_head * group, group, cache.key_row(block, 0, kv_head), stride,
                           tokens_in(index), index * block_size - begin, args.scale);
        }
        Kernel::softmax(st, end - begin);
        for (int64_t index = first_block; index < end_block; ++index) {
          prefetch(index + kPrefetchDistance, 1);
          const int64_t block = block_at(index);
          for (int64_t kv_head = 0; kv_head < shape.num_kv_heads; ++kv_head)
            Kernel::accumulate(st, kv_head * group, group, cache.value_row(block, 0, kv_head),
                               stride, tokens_in(index), index * block_size - begin);
        }
        Kernel::finish(st, natural);

        if (num_parts[s] == 1) {
          for (int64_t h = 0; h < args.num_heads; ++h) {
            T* row = out + s * args.out.token_stride + h * args.out.head_stride;
            const float inv = 1.0f / st.l[h];
            for (int64_t d = 0; d < dim; ++d)
              row[d] = from_float<T>(natural[h * dim_pad + d] * inv);
          }
          return;
        }
        float* partial = partials.get() + unit * partial_stride;
        std::copy(natural, natural + args.num_heads * dim_pad, partial);
        std::copy(st.m.begin(), st.m.end(), partial + args.num_heads * dim_pad);
        std::copy(st.l.begin(), st.l.end(), partial + args.num_heads * dim_pad + args.num_heads);
      });
  if (!any_split) return;

  // Merge: one task per (sequence, query head) of the split sequences.
  at::parallel_for(0, args.num_seqs * args.num_heads, 16, [&](int64_t first, int64_t last) {
    std::vector<float> merged(dim);
    for (int64_t task = first; task < last; ++task) {
      const int64_t s = task / args.num_heads;
      if (num_parts[s] == 1) continue;
      const int64_t h = task % args.num_heads;
      const float* base = partials.get() + unit_begin[s] * partial_stride;
      const int64_t m_at = args.num_heads * dim_pad + h;
      const int64_t l_at = m_at + args.num_heads;
      float m_max = -INFINITY;
      for (int64_t j = 0; j < num_parts[s]; ++j)
        m_max = std::max(m_max, base[j * partial_stride + m_at]);
      std::fill(merged.begin(), merged.end(), 0.0f);
      float total = 0.0f;
      for (int64_t j = 0; j < num_parts[s]; ++j) {
        const float* partial = base + j * partial_stride;
        const float weight = std::exp(partial[m_at] - m_max);
        total += weight * partial[l_at];
        for (int64_t d = 0; d < dim; ++d) merged[d] += weight * partial[h * dim_pad + d];
      }
      T* row = out + s * args.out.token_stride + h * args.out.head_stride;
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
