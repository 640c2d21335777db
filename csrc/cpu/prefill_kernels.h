// AVX512_BF16 tiles for chunked-prefill attention over a paged context.
//
// One unit = (query tile, kv head). Its rows are the tile's query tokens times the G query
// heads of the kv head, row r = token * G + g, padded to a multiple of 16 (`rows_pad`).
// Scores are kept transposed so that vector lanes run over rows:
//
//   S^T[t][r] = q_r . k_t         Qp[dp][r] = (q_r[2dp], q_r[2dp+1])  packed once per unit,
//                                  k_t pairs are broadcast straight from the cache row
//   online softmax per row: a lane-wise max/sum down the key tile's t axis
//   O[r][:] += sum_t P[r][t] v_t   Pw[k][r] = (P[r][2k], P[r][2k+1]) broadcast per row,
//                                  Vp = value rows 2k, 2k+1 pair-interleaved (vec_avx512.h)
//
// so both products are `_mm512_dpbf16_ps` (bf16 x bf16, fp32 sums) with no horizontal sums.
#pragma once

#include <vector>

#include "cpu_types.h"
#include "soft_cap.h"
#include "vec_avx512.h"

#if PROTOSERVE_AVX512_BF16

namespace protoserve::prefill {

constexpr int64_t kKeyTile = 64;  // keys per tile (any blocks; rows come via pointers)

struct TileScratch {
  int64_t rows_pad, head_dim, dim_pad, num_chunks;
  std::vector<uint32_t> qp;   // [head_dim / 2][rows_pad]
  std::vector<float> scores;  // [kKeyTile][rows_pad]
  std::vector<uint32_t> pw;   // [kKeyTile / 2][rows_pad]
  std::vector<bf16_t> vp;     // [kKeyTile / 2][num_chunks][64]
  std::vector<float> out;     // [rows_pad][dim_pad], pair-interleaved per 32-dim chunk
  std::vector<float> m, l, alpha;  // [rows_pad]
  const bf16_t* key_rows[kKeyTile];
  const bf16_t* value_rows[kKeyTile];

  TileScratch(int64_t rows_pad_, int64_t head_dim_)
      : rows_pad(rows_pad_),
        head_dim(head_dim_),
        dim_pad(round_up(head_dim_, 32)),
        num_chunks(dim_pad / 32),
        qp(head_dim_ / 2 * rows_pad_),
        scores(kKeyTile * rows_pad_),
        pw(kKeyTile / 2 * rows_pad_),
        vp(kKeyTile / 2 * num_chunks * 64),
        out(rows_pad_ * dim_pad),
        m(rows_pad_),
        l(rows_pad_),
        alpha(rows_pad_) {}
};

// S^T[t0 .. t0+4)[rv0*16 .. (rv0+RV)*16) over the whole head dim.
template <int RV>
inline void score_tile(TileScratch& ts, int64_t t0, int64_t rv0) {
  __m512 acc[4][RV];
  for (int t = 0; t < 4; ++t)
    for (int v = 0; v < RV; ++v) acc[t][v] = _mm512_setzero_ps();
  const int64_t num_pairs = ts.head_dim / 2;
  for (int64_t dp = 0; dp < num_pairs; ++dp) {
    __m512bh q[RV];
    for (int v = 0; v < RV; ++v)
      q[v] = (__m512bh)_mm512_loadu_si512(ts.qp.data() + dp * ts.rows_pad + (rv0 + v) * 16);
    for (int t = 0; t < 4; ++t) {
      int32_t pair;
      std::memcpy(&pair, ts.key_rows[t0 + t] + 2 * dp, sizeof(pair));
      const __m512bh k = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < RV; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], q[v], k);
    }
  }
  for (int t = 0; t < 4; ++t)
    for (int v = 0; v < RV; ++v)
      _mm512_storeu_ps(ts.scores.data() + (t0 + t) * ts.rows_pad + (rv0 + v) * 16, acc[t][v]);
}

// O[r0 .. r0+4)[chunks c0 .. c0+NC) = alpha_r * O + sum_k Pw[k][r] . Vp[k][c].
template <int NC>
inline void pv_tile(TileScratch& ts, int64_t num_pairs, int64_t r0, int64_t c0) {
  __m512 acc[4][NC][2];
  for (int r = 0; r < 4; ++r) {
    const __m512 alpha = _mm512_set1_ps(ts.alpha[r0 + r]);
    const float* o = ts.out.data() + (r0 + r) * ts.dim_pad + 32 * c0;
    for (int c = 0; c < NC; ++c) {
      acc[r][c][0] = _mm512_mul_ps(_mm512_loadu_ps(o + 32 * c), alpha);
      acc[r][c][1] = _mm512_mul_ps(_mm512_loadu_ps(o + 32 * c + 16), alpha);
    }
  }
  for (int64_t k = 0; k < num_pairs; ++k) {
    __m512bh lo[NC], hi[NC];
    const bf16_t* v = ts.vp.data() + (k * ts.num_chunks + c0) * 64;
    for (int c = 0; c < NC; ++c) {
      lo[c] = (__m512bh)_mm512_loadu_si512(v + 64 * c);
      hi[c] = (__m512bh)_mm512_loadu_si512(v + 64 * c + 32);
    }
    const uint32_t* p = ts.pw.data() + k * ts.rows_pad + r0;
    for (int r = 0; r < 4; ++r) {
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r]));
      for (int c = 0; c < NC; ++c) {
        acc[r][c][0] = _mm512_dpbf16_ps(acc[r][c][0], lo[c], pr);
        acc[r][c][1] = _mm512_dpbf16_ps(acc[r][c][1], hi[c], pr);
      }
    }
  }
  for (int r = 0; r < 4; ++r) {
    float* o = ts.out.data() + (r0 + r) * ts.dim_pad + 32 * c0;
    for (int c = 0; c < NC; ++c) {
      _mm512_storeu_ps(o + 32 * c, acc[r][c][0]);
      _mm512_storeu_ps(o + 32 * c + 16, acc[r][c][1]);
    }
  }
}

// All scores of a key tile of n keys (rows past n repeat the last key; ignored later).
inline void compute_scores(TileScratch& ts, int64_t n) {
  for (int64_t t = n; t < round_up(n, 4); ++t) ts.key_rows[t] = ts.key_rows[n - 1];
  const int64_t num_vectors = ts.rows_pad / 16;
  for (int64_t t0 = 0; t0 < n; t0 += 4)
    for (int64_t rv0 = 0; rv0 < num_vectors; rv0 += 4) {
      switch (std::min<int64_t>(4, num_vectors - rv0)) {
        case 1: score_tile<1>(ts, t0, rv0); break;
        case 2: score_tile<2>(ts, t0, rv0); break;
        case 3: score_tile<3>(ts, t0, rv0); break;
        default: score_tile<4>(ts, t0, rv0); break;
      }
    }
}

// Online-softmax step over a key tile whose first key sits at position `key_pos`.
// query_pos[r] is row r's position; key t is visible to row r iff key_pos + t <= query_pos[r]
// and, with a sliding window (window > 0), query_pos[r] - (key_pos + t) < window. A soft_cap
// > 0 caps the scaled scores first. Writes Pw (bf16 pairs, a zero partner for an odd n) and
// alpha, updates m and l.
inline void softmax_tile(TileScratch& ts, int64_t n, int64_t key_pos, const int32_t* query_pos,
                         bool needs_mask, float scale, int64_t window, float soft_cap) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  const bool capped = soft_cap > 0.0f;
  const __m512 cap_v = _mm512_set1_ps(soft_cap);
  const __m512 inv_cap = _mm512_set1_ps(capped ? 1.0f / soft_cap : 0.0f);
  // Positions fit int32 (the caller drops a window wider than the context).
  const __m512i window_v = _mm512_set1_epi32(static_cast<int>(window));
  for (int64_t r0 = 0; r0 < ts.rows_pad; r0 += 16) {
    const __m512i qpos = _mm512_loadu_si512(query_pos + r0);
    auto visible = [&](int64_t t) -> __mmask16 {
      if (!needs_mask) return 0xffff;
      const __m512i key = _mm512_set1_epi32(static_cast<int>(key_pos + t));
      const __mmask16 causal = _mm512_cmpge_epi32_mask(qpos, key);
      if (window <= 0) return causal;
      return causal & _mm512_cmplt_epi32_mask(qpos, _mm512_add_epi32(key, window_v));
    };
    __m512 tile_max = neg_inf;
    for (int64_t t = 0; t < n; ++t) {
      float* s = ts.scores.data() + t * ts.rows_pad + r0;
      __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(s), scale_v);
      if (capped) scaled = soft_cap_ps(scaled, cap_v, inv_cap);
      _mm512_storeu_ps(s, scaled);
      tile_max = _mm512_mask_max_ps(tile_max, visible(t), tile_max, scaled);
    }
    // Every row sees a key of the first tile (a tile has at most kKeyTile query tokens, see
    // prefill_attention.cpp), so m is finite from then on.
    const __m512 m_old = _mm512_loadu_ps(ts.m.data() + r0);
    const __m512 m_new = _mm512_max_ps(m_old, tile_max);
    const __m512 alpha = vec::exp_ps(_mm512_sub_ps(m_old, m_new));
    __m512 sum = _mm512_setzero_ps();
    __m512 previous = _mm512_setzero_ps();
    for (int64_t t = 0; t < round_up(n, 2); ++t) {
      __m512 p = _mm512_setzero_ps();
      if (t < n) {
        const __m512 s = _mm512_loadu_ps(ts.scores.data() + t * ts.rows_pad + r0);
        p = _mm512_maskz_mov_ps(visible(t), vec::exp_ps(_mm512_sub_ps(s, m_new)));
        sum = _mm512_add_ps(sum, p);
      }
      if (t % 2 == 0) {
        previous = p;
      } else {
        _mm512_storeu_si512(ts.pw.data() + (t / 2) * ts.rows_pad + r0,
                            vec::pack_pairs(previous, p));
      }
    }
    _mm512_storeu_ps(ts.alpha.data() + r0, alpha);
    _mm512_storeu_ps(ts.l.data() + r0,
                     _mm512_fmadd_ps(_mm512_loadu_ps(ts.l.data() + r0), alpha, sum));
    _mm512_storeu_ps(ts.m.data() + r0, m_new);
  }
}

// Value rows 2k, 2k+1 of the tile, pair-interleaved per 32-dim chunk (zero past n).
inline void pack_values(TileScratch& ts, int64_t n) {
  for (int64_t k = 0; 2 * k < n; ++k) {
    for (int64_t c = 0; c < ts.num_chunks; ++c) {
      const int count = static_cast<int>(std::min<int64_t>(32, ts.head_dim - 32 * c));
      const __m512i a = vec::load_bf16x32(ts.value_rows[2 * k] + 32 * c, count);
      const __m512i b = 2 * k + 1 < n ? vec::load_bf16x32(ts.value_rows[2 * k + 1] + 32 * c, count)
                                      : _mm512_setzero_si512();
      bf16_t* dst = ts.vp.data() + (k * ts.num_chunks + c) * 64;
      _mm512_storeu_si512(dst, _mm512_unpacklo_epi16(a, b));
      _mm512_storeu_si512(dst + 32, _mm512_unpackhi_epi16(a, b));
    }
  }
}

inline void accumulate_values(TileScratch& ts, int64_t n) {
  const int64_t num_pairs = ceil_div(n, 2);
  for (int64_t r0 = 0; r0 < ts.rows_pad; r0 += 4)
    for (int64_t c0 = 0; c0 < ts.num_chunks; c0 += 2) {
      if (c0 + 1 < ts.num_chunks) pv_tile<2>(ts, num_pairs, r0, c0);
      else pv_tile<1>(ts, num_pairs, r0, c0);
    }
}

}  // namespace protoserve::prefill

#endif  // PROTOSERVE_AVX512_BF16
