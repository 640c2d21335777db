// paged_prefill_attention: the query rows of one sequence attend causally over its paged
// context, all of it read from the cache (the chunk's own K/V are written there first):
//
//   positions:  0 ........ context_start ........ context_start + num_query_tokens
//               [ cached context ][ this chunk's tokens (queries) ]
//   query i (position context_start + i) sees keys at positions [0, context_start + i].
//
// With a sliding window W it sees only [context_start + i - W + 1, context_start + i]: a tile
// starts its keys at its first row's window start, so blocks before it are never read, and
// the rows' masks add the window's lower bound. A soft-cap C makes each scaled score
// C * tanh(s / C).
//
// Work units are (query tile, kv head); a tile holds `tile_tokens` query tokens times the G
// query heads that share the kv head. Later tiles see more keys, so they are handed out first.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "prefill_kernels.h"
#include "soft_cap.h"

namespace protoserve {
namespace {

// Query rows (tokens x group heads) per tile: enough reuse of each K/V row, small enough
// scratch for L2.
constexpr int64_t kQueryTileRows = 64;

struct Tiling {
  int64_t group, tile_tokens, num_tiles;

  Tiling(const PrefillArgs& args) {
    group = args.num_heads / args.cache.num_kv_heads;
    tile_tokens = std::max<int64_t>(1, kQueryTileRows / group);
    num_tiles = ceil_div(args.num_query_tokens, tile_tokens);
  }
  // unit -> (tile, kv_head), largest tiles first.
  int64_t tile_of(int64_t unit, int64_t num_kv_heads) const {
    return num_tiles - 1 - unit / num_kv_heads;
  }
};

template <typename T>
void run_portable(const PrefillArgs& args) {
  const PagedCache<T> cache{static_cast<const T*>(args.kv_cache), args.cache.num_blocks,
                            args.cache.block_size, args.cache.num_kv_heads, args.cache.head_dim};
  const Tiling tiling(args);
  const int64_t dim = cache.head_dim;
  const int64_t bs = cache.block_size;
  const int64_t context_len = args.context_start + args.num_query_tokens;
  const T* query = static_cast<const T*>(args.query.data);
  T* out = static_cast<T*>(args.out.data);
  for_each_unit(
      tiling.num_tiles * cache.num_kv_heads,
      [&] { return std::make_pair(std::vector<float>(context_len), std::vector<float>(2 * dim)); },
      [&](int64_t unit, auto& worker) {
        float* scores = worker.first.data();
        float* q = worker.second.data();
        float* acc = q + dim;
        const int64_t kv_head = unit % cache.num_kv_heads;
        const int64_t first = tiling.tile_of(unit, cache.num_kv_heads) * tiling.tile_tokens;
        const int64_t last = std::min(args.num_query_tokens, first + tiling.tile_tokens);
        for (int64_t i = first; i < last; ++i)
          for (int64_t g = 0; g < tiling.group; ++g) {
            const int64_t head = kv_head * tiling.group + g;
            const T* q_row = query + i * args.query.token_stride + head * args.query.head_stride;
            for (int64_t d = 0; d < dim; ++d) q[d] = to_float(q_row[d]);
            const int64_t num_keys = args.context_start + i + 1;
            const int64_t first_key =
                args.sliding_window > 0 ? std::max<int64_t>(0, num_keys - args.sliding_window) : 0;
            float m = -INFINITY;
            for (int64_t t = first_key; t < num_keys; ++t) {
              const T* k = cache.key_row(args.block_table.at(0, t / bs), t % bs, kv_head);
              scores[t] = dot_product(q, k, dim) * args.scale;
              if (args.soft_cap > 0.0f)
                scores[t] = args.soft_cap * std::tanh(scores[t] / args.soft_cap);
              m = std::max(m, scores[t]);
            }
            std::fill(acc, acc + dim, 0.0f);
            float l = 0.0f;
            for (int64_t t = first_key; t < num_keys; ++t) {
              const float p = std::exp(scores[t] - m);
              l += p;
              const T* v = cache.value_row(args.block_table.at(0, t / bs), t % bs, kv_head);
              for (int64_t d = 0; d < dim; ++d) acc[d] += p * to_float(v[d]);
            }
            if (args.sinks != nullptr) l += std::exp(args.sinks[head] - m);
            T* o = out + i * args.out.token_stride + head * args.out.head_stride;
            for (int64_t d = 0; d < dim; ++d) o[d] = from_float<T>(acc[d] / l);
          }
      });
}

#if PROTOSERVE_AVX512_BF16
void run_avx512_bf16(const PrefillArgs& args) {
  using prefill::kKeyTile;
  static_assert(kKeyTile >= kQueryTileRows, "a row would see no key of its tile's first key tile");
  using prefill::TileScratch;
  const PagedCache<bf16_t> cache{static_cast<const bf16_t*>(args.kv_cache), args.cache.num_blocks,
                                 args.cache.block_size, args.cache.num_kv_heads,
                                 args.cache.head_dim};
  const Tiling tiling(args);
  const int64_t dim = cache.head_dim;
  const int64_t bs = cache.block_size;
  const int64_t rows_pad = round_up(tiling.tile_tokens * tiling.group, 16);
  const bf16_t* query = static_cast<const bf16_t*>(args.query.data);
  bf16_t* out = static_cast<bf16_t*>(args.out.data);
  for_each_unit(
      tiling.num_tiles * cache.num_kv_heads,
      [&] { return std::make_pair(TileScratch(rows_pad, dim), std::vector<int32_t>(rows_pad)); },
      [&](int64_t unit, auto& worker) {
        TileScratch& ts = worker.first;
        int32_t* query_pos = worker.second.data();
        const int64_t kv_head = unit % cache.num_kv_heads;
        const int64_t first = tiling.tile_of(unit, cache.num_kv_heads) * tiling.tile_tokens;
        const int64_t num_tokens = std::min(args.num_query_tokens - first, tiling.tile_tokens);
        const int64_t num_rows = num_tokens * tiling.group;
        // Rows past num_rows are padding: zero queries that copy the last real row's position,
        // so they always see at least one key and stay finite.
        for (int64_t r = 0; r < rows_pad; ++r) {
          const int64_t i = first + std::min(r, num_rows - 1) / tiling.group;
          query_pos[r] = static_cast<int32_t>(args.context_start + i);
          const int64_t head = kv_head * tiling.group + r % tiling.group;
          const bf16_t* q_row =
              query + i * args.query.token_stride + head * args.query.head_stride;
          for (int64_t dp = 0; dp < dim / 2; ++dp) {
            uint32_t pair = 0;
            if (r < num_rows) std::memcpy(&pair, q_row + 2 * dp, sizeof(pair));
            ts.qp[dp * rows_pad + r] = pair;
          }
        }
        std::fill(ts.out.begin(), ts.out.end(), 0.0f);
        std::fill(ts.m.begin(), ts.m.end(), -INFINITY);
        std::fill(ts.l.begin(), ts.l.end(), 0.0f);

        const int64_t min_query_pos = args.context_start + first;
        const int64_t num_keys = args.context_start + first + num_tokens;
        const int64_t window = args.sliding_window;
        const int64_t first_key = window > 0 ? std::max<int64_t>(0, min_query_pos - window + 1) : 0;
        for (int64_t key_pos = first_key; key_pos < num_keys; key_pos += kKeyTile) {
          const int64_t n = std::min(kKeyTile, num_keys - key_pos);
          for (int64_t t = 0; t < n; ++t) {
            const int64_t pos = key_pos + t;
            const int64_t block = args.block_table.at(0, pos / bs);
            ts.key_rows[t] = cache.key_row(block, pos % bs, kv_head);
            ts.value_rows[t] = cache.value_row(block, pos % bs, kv_head);
          }
          prefill::compute_scores(ts, n);
          // Some row misses a key of this tile: a later key (causal) or, with a window, an
          // earlier one (the last row's window starts after key_pos).
          const bool needs_mask = key_pos + n - 1 > min_query_pos ||
                                  (window > 0 && key_pos <= num_keys - 1 - window);
          prefill::softmax_tile(ts, n, key_pos, query_pos, needs_mask, args.scale, window,
                                args.soft_cap);
          prefill::pack_values(ts, n);
          prefill::accumulate_values(ts, n);
        }

        std::vector<float> natural(ts.dim_pad);
        for (int64_t r = 0; r < num_rows; ++r) {
          const float* o = ts.out.data() + r * ts.dim_pad;
          for (int64_t c = 0; c < ts.dim_pad; c += 32)
            vec::deinterleave(_mm512_loadu_ps(o + c), _mm512_loadu_ps(o + c + 16),
                              natural.data() + c);
          const int64_t head = kv_head * tiling.group + r % tiling.group;
          const float sink = args.sinks != nullptr ? std::exp(args.sinks[head] - ts.m[r]) : 0.0f;
          const __m512 inv = _mm512_set1_ps(1.0f / (ts.l[r] + sink));
          bf16_t* dst = out + (first + r / tiling.group) * args.out.token_stride +
                        head * args.out.head_stride;
          for (int64_t d = 0; d < dim; d += 16) {
            const __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(natural.data() + d), inv);
            const __m256i packed = (__m256i)_mm512_cvtneps_pbh(scaled);
            const int count = static_cast<int>(std::min<int64_t>(16, dim - d));
            _mm256_mask_storeu_epi16(dst + d, static_cast<__mmask16>((1u << count) - 1), packed);
          }
        }
      });
}
#endif

}  // namespace

void paged_prefill_attention(const PrefillArgs& call) {
  if (call.num_query_tokens <= 0) return;
  PrefillArgs args = call;
  // A window that holds the whole context changes nothing (and keeps positions + W in int32).
  if (args.sliding_window >= args.context_start + args.num_query_tokens) args.sliding_window = 0;
  if (args.kind == ScalarKind::kFloat32) {
    run_portable<float>(args);
    return;
  }
#if PROTOSERVE_AVX512_BF16
  if (args.cache.head_dim % 2 == 0) {
    run_avx512_bf16(args);
    return;
  }
#endif
  run_portable<bf16_t>(args);
}

}  // namespace protoserve
