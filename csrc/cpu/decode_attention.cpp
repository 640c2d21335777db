// paged_decode_attention: one query token per sequence over its paged context.
//
// Work units are (sequence, context partition), all heads at once: a block's K rows for all
// kv heads are one contiguous run of block_size * num_kv_heads * head_dim elements, so a unit
// reads whole blocks instead of one head's 256-byte slices at a 2 KiB stride. A partition is
// kPartitionTokens tokens (a whole number of blocks), so a long context at batch 1 still
// yields enough units to keep every thread busy (flash-decoding):
//
//   context of sequence s:  [ part 0 | part 1 | ... | part P-1 ]      P = ceil(len / part_len)
//   units:                  unit_begin[s] + part
//
// A sequence with one partition writes its output directly. Otherwise every partition stores
// (m, l, acc) per head, and the thread that finishes the sequence's last partition merges
// them (no second parallel pass; the partials are still in cache):
//
//   M = max_j m_j,   out = sum_j exp(m_j - M) * acc_j  /  sum_j exp(m_j - M) * l_j
//
// The partition length does not depend on the thread count, so results are reproducible.
//
// Sliding window W: the query at p = len - 1 sees positions [len - W, len). Partitions stay on
// the same part_len grid, starting with the one that holds len - W; within it the unit starts
// at that position's block, whose leading keys before len - W (`hidden`) get score -inf. So a
// long context with a small window reads O(W) tokens:
//
//   context:  [ part 0 | part 1 | part 2 | part 3 ]
//   window:                  [xx|#######]            first unit: blocks from the window's
//                                                    first, its xx keys masked
//
// A soft-cap C rewrites the partition's scores to C * tanh(s / C) before the softmax.
//
// Memory. Blocks lie anywhere in the cache, and the hardware prefetchers stop at 4 KiB
// pages, so left alone a unit waits on one miss after another and reads ~8 GB/s a core.
// Each worker instead prefetches its own read order into L2, kPrefetchBytes ahead of the
// compute:
//
//   stream:  K blocks of this unit | V blocks of this unit | K blocks of the worker's next
//            unit (claimed when the V pass starts)
//   slice:   1 / num_kv_heads of a block (block_size * head_dim elements, 4 KiB at 16 x 128
//            bf16); computing (block b, kv head h) prefetches the slice `ahead` slices on
//
// so the misses go out at the pace of the compute, a tile at a time (decode_avx512.h). A
// worker's first unit starts by requesting its first `ahead` slices at once.
//
// What still bounds it (Zen 4, 2 cores): a core has a limited number of misses in flight, a
// prefetch that finds none free holds up the instructions behind it, and the compute (~40
// cycles per token and kv head, half of it dpbf16) overlaps the memory time only in part.
// One core reads ~13 GB/s of K/V where a bare prefetch-and-sum loop over the same blocks
// reads ~20; two cores ~22-25 GB/s of the ~30 a 1 GiB torch sum reads.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

#include "cpu_ops.h"
#include "decode_avx512.h"
#include "kv_int8.h"
#include "soft_cap.h"

namespace protoserve {
namespace {

constexpr int64_t kPartitionTokens = 256;
// Far enough ahead to cover the memory latency at full bandwidth, near enough that the
// prefetched lines are still in L2 (1 MiB on Zen 4) when the compute gets there.
constexpr int64_t kPrefetchBytes = 64 * 1024;

void prefetch_l2(const void* start, int64_t bytes) {
  if (start == nullptr) return;
  const char* first = static_cast<const char*>(start);
  for (const char* line = first; line < first + bytes; line += 64) __builtin_prefetch(line, 0, 2);
}

// Tokens [begin, end) of sequence `seq`, blocks [first_block, end_block) of its table;
// seq < 0 for no unit. The first `hidden` tokens lie before the sliding window (masked).
struct UnitSpan {
  int64_t seq = -1;
  int64_t begin = 0, end = 0;
  int64_t hidden = 0;
  int64_t first_block = 0, end_block = 0;
  int64_t num_blocks() const { return end_block - first_block; }
};

template <typename T>
struct Partitioning {
  const DecodeArgs& args;
  PagedCache<T> cache;
  int64_t block_size;
  int64_t part_len;
  std::vector<int64_t> unit_begin;  // [num_seqs + 1]

  explicit Partitioning(const DecodeArgs& a)
      : args(a),
        cache{static_cast<const T*>(a.kv_cache), a.cache.num_blocks, a.cache.block_size,
              a.cache.num_kv_heads, a.cache.head_dim},
        block_size(a.cache.block_size),
        part_len(std::max(block_size, round_up(kPartitionTokens, block_size))),
        unit_begin(a.num_seqs + 1, 0) {
    for (int64_t s = 0; s < a.num_seqs; ++s)
      unit_begin[s + 1] =
          unit_begin[s] + ceil_div(a.context_lens[s], part_len) - window_start(s) / part_len;
  }

  // First position the query of sequence s sees.
  int64_t window_start(int64_t s) const {
    if (args.sliding_window <= 0) return 0;
    return std::max<int64_t>(0, args.context_lens[s] - args.sliding_window);
  }

  int64_t num_units() const { return unit_begin.back(); }
  int64_t num_parts(int64_t s) const { return unit_begin[s + 1] - unit_begin[s]; }

  UnitSpan span(int64_t unit) const {
    UnitSpan u;
    if (unit >= num_units()) return u;
    u.seq = std::upper_bound(unit_begin.begin(), unit_begin.end(), unit) - unit_begin.begin() - 1;
    const int64_t start = window_start(u.seq);
    const int64_t part_begin = (start / part_len + unit - unit_begin[u.seq]) * part_len;
    // part_len is a whole number of blocks, so begin stays block aligned.
    u.begin = std::max(part_begin, start / block_size * block_size);
    u.end = std::min(args.context_lens[u.seq], part_begin + part_len);
    u.hidden = std::max<int64_t>(0, start - u.begin);
    u.first_block = u.begin / block_size;
    u.end_block = ceil_div(u.end, block_size);
    return u;
  }

  int64_t tokens_in(const UnitSpan& u, int64_t index) const {
    return std::min(block_size, u.end - index * block_size);
  }

  // All rows of block `index` of u: K (kv = 0) or V, token-major.
  const T* rows(const UnitSpan& u, int64_t index, int kv) const {
    const int64_t block = args.block_tables.at(u.seq, index);
    return kv == 0 ? cache.key_row(block, 0, 0) : cache.value_row(block, 0, 0);
  }

  // Start of slice `slice` of the prefetch stream (see the top), or null past its end.
  const T* slice_at(const UnitSpan& cur, const UnitSpan& next, int64_t slice) const {
    const int64_t per_block = cache.num_kv_heads;
    int64_t element = slice / per_block;
    const T* block_rows;
    if (element < cur.num_blocks()) {
      block_rows = rows(cur, cur.first_block + element, 0);
    } else if ((element -= cur.num_blocks()) < cur.num_blocks()) {
      block_rows = rows(cur, cur.first_block + element, 1);
    } else if ((element -= cur.num_blocks()) < next.num_blocks() && next.seq >= 0) {
      block_rows = rows(next, next.first_block + element, 0);
    } else {
      return nullptr;
    }
    return block_rows + (slice % per_block) * block_size * cache.head_dim;
  }
};

// Window mask and soft-cap on the unit's scores, between the two passes.
void shape_scores(DecodeState& st, const UnitSpan& u, float soft_cap) {
  const int64_t n = u.end - u.begin;
  for (int64_t h = 0; h < st.num_heads; ++h) {
    float* s = st.scores.data() + h * st.part_pad;
    if (soft_cap > 0.0f) soft_cap_scores(s + u.hidden, n - u.hidden, soft_cap);
    std::fill(s, s + u.hidden, -INFINITY);
  }
}

// out rows of sequence s from its partitions' (acc, m, l) at `base`.
template <typename T>
void merge_partitions(const DecodeArgs& args, const float* base, int64_t num_parts,
                      int64_t partial_stride, int64_t dim, int64_t dim_pad, int64_t s,
                      float* merged) {
  for (int64_t h = 0; h < args.num_heads; ++h) {
    const int64_t m_at = args.num_heads * dim_pad + h;
    const int64_t l_at = m_at + args.num_heads;
    float m_max = -INFINITY;
    for (int64_t j = 0; j < num_parts; ++j)
      m_max = std::max(m_max, base[j * partial_stride + m_at]);
    std::fill(merged, merged + dim, 0.0f);
    float total = 0.0f;
    for (int64_t j = 0; j < num_parts; ++j) {
      const float* partial = base + j * partial_stride;
      const float weight = std::exp(partial[m_at] - m_max);
      total += weight * partial[l_at];
      for (int64_t d = 0; d < dim; ++d) merged[d] += weight * partial[h * dim_pad + d];
    }
    if (args.sinks != nullptr) total += std::exp(args.sinks[h] - m_max);
    T* row = static_cast<T*>(args.out.data) + s * args.out.token_stride + h * args.out.head_stride;
    for (int64_t d = 0; d < dim; ++d) row[d] = from_float<T>(merged[d] / total);
  }
}

// T: the cache's element type; Q: the query's and output's (they differ for an int8 cache,
// whose rows are head_dim values + a scale: `row` elements apart per kv head).
template <typename T, typename Kernel, typename Q = T>
void run_decode(const DecodeArgs& args) {
  const Partitioning<T> plan(args);
  const int64_t num_units = plan.num_units();
  if (num_units == 0) return;
  const int64_t num_kv = args.cache.num_kv_heads;
  const int64_t group = args.num_heads / num_kv;
  const int64_t row = args.cache.head_dim;
  const int64_t dim = args.int8_cache ? row - kInt8ScaleBytes : row;
  const int64_t dim_pad = round_up(dim, 32);
  const int64_t block_size = plan.block_size;
  const int64_t stride = plan.cache.token_stride();
  const int64_t ahead = std::max<int64_t>(
      1, ceil_div(kPrefetchBytes, block_size * dim * static_cast<int64_t>(sizeof(T))));

  bool any_split = false;
  for (int64_t s = 0; s < args.num_seqs; ++s) any_split |= plan.num_parts(s) > 1;
  // Per unit of a split sequence: [num_heads][dim_pad] acc, then [num_heads] m, [num_heads] l.
  // Every slot is written before it is read: no zero-fill (megabytes at large batch).
  const int64_t partial_stride = args.num_heads * (dim_pad + 2);
  std::unique_ptr<float[]> partials(any_split ? new float[num_units * partial_stride] : nullptr);
  std::unique_ptr<std::atomic<int64_t>[]> parts_done(
      any_split ? new std::atomic<int64_t>[args.num_seqs] : nullptr);
  for (int64_t s = 0; any_split && s < args.num_seqs; ++s) parts_done[s].store(0);

  Q* out = static_cast<Q*>(args.out.data);
  const Q* query = static_cast<const Q*>(args.query.data);
  // Units go out one at a time from a shared counter (ragged contexts stay balanced); a
  // worker claims its next unit early only to know what to prefetch.
  std::atomic<int64_t> next_unit{0};
  const int64_t num_threads = std::min<int64_t>(at::get_num_threads(), num_units);
  protoserve::work_pool::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    DecodeState st(args.num_heads, dim, plan.part_len);
    std::vector<float> natural(args.num_heads * dim_pad);
    int64_t unit = next_unit.fetch_add(1);
    // Leading slices of this unit that the previous unit's V pass did not prefetch.
    int64_t unfetched = ahead;
    while (unit < num_units) {
      const UnitSpan cur = plan.span(unit);
      UnitSpan next;
      const int64_t s = cur.seq;
      const int64_t nb = cur.num_blocks();
      for (int64_t slice = 0; slice < unfetched; ++slice)
        prefetch_l2(plan.slice_at(cur, next, slice), block_size * dim * int64_t(sizeof(T)));

      Kernel::load_query(st, query + s * args.query.token_stride, args.query.head_stride);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t index = cur.first_block + i;
        const T* keys = plan.rows(cur, index, 0);
        for (int64_t kv = 0; kv < num_kv; ++kv)
          Kernel::scores(st, kv * group, group, keys + kv * row, stride, plan.tokens_in(cur, index),
                         index * block_size - cur.begin, args.scale,
                         plan.slice_at(cur, next, i * num_kv + kv + ahead));
      }
      if (cur.hidden > 0 || args.soft_cap > 0.0f) shape_scores(st, cur, args.soft_cap);
      Kernel::softmax(st, cur.end - cur.begin);

      const int64_t following = next_unit.fetch_add(1);
      next = plan.span(following);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t index = cur.first_block + i;
        const T* values = plan.rows(cur, index, 1);
        for (int64_t kv = 0; kv < num_kv; ++kv)
          Kernel::accumulate(st, kv * group, group, values + kv * row, stride,
                             plan.tokens_in(cur, index), index * block_size - cur.begin,
                             plan.slice_at(cur, next, (nb + i) * num_kv + kv + ahead));
      }
      unfetched = std::max<int64_t>(0, ahead - nb * num_kv);

      if (plan.num_parts(s) == 1) {
        Kernel::finish(st, natural.data());
        for (int64_t h = 0; h < args.num_heads; ++h) {
          Q* out_row = out + s * args.out.token_stride + h * args.out.head_stride;
          const float sink =
              args.sinks != nullptr ? std::exp(args.sinks[h] - st.m[h]) : 0.0f;
          const float inv = 1.0f / (st.l[h] + sink);
          for (int64_t d = 0; d < dim; ++d)
            out_row[d] = from_float<Q>(natural[h * dim_pad + d] * inv);
        }
      } else {
        float* partial = partials.get() + unit * partial_stride;
        Kernel::finish(st, partial);
        std::copy(st.m.begin(), st.m.end(), partial + args.num_heads * dim_pad);
        std::copy(st.l.begin(), st.l.end(), partial + args.num_heads * dim_pad + args.num_heads);
        // acq_rel: the last finisher sees every other partition's stores.
        if (parts_done[s].fetch_add(1, std::memory_order_acq_rel) + 1 == plan.num_parts(s))
          merge_partitions<Q>(args, partials.get() + plan.unit_begin[s] * partial_stride,
                              plan.num_parts(s), partial_stride, dim, dim_pad, s,
                              natural.data());
      }
      unit = following;
    }
  });
}

}  // namespace

void paged_decode_attention(const DecodeArgs& args) {
  if (args.int8_cache) {
    if (args.kind == ScalarKind::kFloat32)
      run_decode<int8_t, Int8Decode<float>, float>(args);
    else
      run_decode<int8_t, Int8Decode<bf16_t>, bf16_t>(args);
    return;
  }
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
