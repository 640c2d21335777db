// Per-block steps of paged decode attention for one (sequence, kv head, context partition):
// the G query heads that share the kv head are processed together, so each K/V row is read
// from memory once per kv head, not once per query head.
//
// Online softmax, per query head g, over the blocks of the partition in order:
//
//   s_t   = scale * q_g . k_t                          (fp32)
//   m'    = max(m, max_t s_t);   alpha = exp(m - m')
//   l'    = alpha * l + sum_t exp(s_t - m')
//   acc'  = alpha * acc + sum_t exp(s_t - m') * v_t    (fp32)
//
// and the partition's result is (m, l, acc): acc / l when it covers the whole context.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_types.h"
#include "vec_avx512.h"

namespace protoserve {

// Scratch of one worker thread, reused for every unit it runs.
struct DecodeState {
  int64_t group;       // query heads per kv head
  int64_t head_dim;
  int64_t dim_pad;     // head_dim rounded up to 32 (one bf16 vector)
  int64_t tokens_pad;  // block_size rounded up to 32: probs of odd counts pair with a zero
  std::vector<float> m, l;
  std::vector<float> acc;            // [group][dim_pad]; layout is the kernel's own
  std::vector<float> scores;         // [group][tokens_pad]
  std::vector<float> query;          // [group][head_dim], portable kernel
  std::vector<bf16_t> query_bf16;    // [group][dim_pad] zero padded, vector kernel
  std::vector<bf16_t> probs;         // [group][tokens_pad], vector kernel

  DecodeState(int64_t group_, int64_t head_dim_, int64_t block_size)
      : group(group_),
        head_dim(head_dim_),
        dim_pad(round_up(head_dim_, 32)),
        tokens_pad(round_up(block_size, 32)),
        m(group_),
        l(group_),
        acc(group_ * dim_pad),
        scores(group_ * tokens_pad),
        query(group_ * head_dim_),
        query_bf16(group_ * dim_pad, 0),
        probs(group_ * tokens_pad, 0) {}

  void reset() {
    std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.0f);
    std::fill(acc.begin(), acc.end(), 0.0f);
  }
};

// Plain C++ for any element type (fp32, or bf16 where AVX512_BF16 is missing); loops over the
// contiguous head dim are left to the compiler's vectoriser.
template <typename T>
struct PortableDecode {
  static void load_query(DecodeState& st, const T* query, int64_t head_stride) {
    for (int64_t g = 0; g < st.group; ++g)
      for (int64_t d = 0; d < st.head_dim; ++d)
        st.query[g * st.head_dim + d] = to_float(query[g * head_stride + d]);
  }

  static void attend_block(DecodeState& st, const T* keys, const T* values, int64_t stride,
                           int64_t n, float scale) {
    const int64_t dim = st.head_dim;
    for (int64_t g = 0; g < st.group; ++g) {
      const float* q = st.query.data() + g * dim;
      float* s = st.scores.data() + g * st.tokens_pad;
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) {
        const T* k = keys + t * stride;
        float dot = 0.0f;
        for (int64_t d = 0; d < dim; ++d) dot += q[d] * to_float(k[d]);
        s[t] = dot * scale;
        block_max = std::max(block_max, s[t]);
      }
      const float m_new = std::max(st.m[g], block_max);
      const float alpha = std::exp(st.m[g] - m_new);  // exp(-inf) = 0 on the first block
      float* acc = st.acc.data() + g * st.dim_pad;
      if (alpha != 1.0f)
        for (int64_t d = 0; d < dim; ++d) acc[d] *= alpha;
      float sum = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        const float p = std::exp(s[t] - m_new);
        sum += p;
        const T* v = values + t * stride;
        for (int64_t d = 0; d < dim; ++d) acc[d] += p * to_float(v[d]);
      }
      st.l[g] = st.l[g] * alpha + sum;
      st.m[g] = m_new;
    }
  }

  // natural[g * dim_pad + d] = acc in natural dim order.
  static void finish(DecodeState& st, float* natural) {
    std::copy(st.acc.begin(), st.acc.end(), natural);
  }
};

#if PROTOSERVE_AVX512_BF16

// bf16 with AVX512_BF16: q.k and p.v both run on `_mm512_dpbf16_ps` (bf16 products, fp32
// sums). Probabilities are rounded to bf16 for p.v, as the reference does before its matmul.
struct Avx512Bf16Decode {
  static void load_query(DecodeState& st, const bf16_t* query, int64_t head_stride) {
    for (int64_t g = 0; g < st.group; ++g)
      std::memcpy(st.query_bf16.data() + g * st.dim_pad, query + g * head_stride,
                  st.head_dim * sizeof(bf16_t));
  }

  static void attend_block(DecodeState& st, const bf16_t* keys, const bf16_t* values,
                           int64_t stride, int64_t n, float scale) {
    block_scores(st, keys, stride, n, scale);
    softmax_update(st, n);
    const int64_t num_chunks = st.dim_pad / 32;
    for (int64_t c0 = 0; c0 < num_chunks; c0 += 2) {
      const bool two = c0 + 1 < num_chunks;
      for (int64_t g0 = 0; g0 < st.group; g0 += 4) {
        const int64_t gt = std::min<int64_t>(4, st.group - g0);
        switch (gt * 2 + (two ? 1 : 0)) {
          case 2: accumulate_pv<1, 1>(st, values, stride, n, g0, c0); break;
          case 3: accumulate_pv<1, 2>(st, values, stride, n, g0, c0); break;
          case 4: accumulate_pv<2, 1>(st, values, stride, n, g0, c0); break;
          case 5: accumulate_pv<2, 2>(st, values, stride, n, g0, c0); break;
          case 6: accumulate_pv<3, 1>(st, values, stride, n, g0, c0); break;
          case 7: accumulate_pv<3, 2>(st, values, stride, n, g0, c0); break;
          case 8: accumulate_pv<4, 1>(st, values, stride, n, g0, c0); break;
          default: accumulate_pv<4, 2>(st, values, stride, n, g0, c0); break;
        }
      }
    }
  }

  static void finish(DecodeState& st, float* natural) {
    for (int64_t g = 0; g < st.group; ++g) {
      const float* acc = st.acc.data() + g * st.dim_pad;
      for (int64_t c = 0; c < st.dim_pad; c += 32)
        vec::deinterleave(_mm512_loadu_ps(acc + c), _mm512_loadu_ps(acc + c + 16),
                          natural + g * st.dim_pad + c);
    }
  }

 private:
  // scores[g][t] for t < n, sixteen tokens at a time: one dpbf16 accumulator per token,
  // folded by hsum16. Rows past n repeat row n - 1 (valid memory; their lanes are ignored).
  static void block_scores(DecodeState& st, const bf16_t* keys, int64_t stride, int64_t n,
                           float scale) {
    const int64_t num_chunks = st.dim_pad / 32;
    const int tail = static_cast<int>(st.head_dim - 32 * (num_chunks - 1));
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
      const bf16_t* rows[16];
      for (int t = 0; t < 16; ++t) rows[t] = keys + (t0 + std::min<int64_t>(t, n - t0 - 1)) * stride;
      for (int64_t g = 0; g < st.group; ++g) {
        const bf16_t* q = st.query_bf16.data() + g * st.dim_pad;
        __m512 acc[16];
        for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t c = 0; c < num_chunks; ++c) {
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + 32 * c);
          const int count = c + 1 < num_chunks ? 32 : tail;
#pragma GCC unroll 16
          for (int t = 0; t < 16; ++t) {
            const __m512i kv = vec::load_bf16x32(rows[t] + 32 * c, count);
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)kv, qv);
          }
        }
        _mm512_storeu_ps(st.scores.data() + g * st.tokens_pad + t0,
                         _mm512_mul_ps(vec::hsum16(acc), scale_v));
      }
    }
  }

  static void softmax_update(DecodeState& st, int64_t n) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t g = 0; g < st.group; ++g) {
      const float* s = st.scores.data() + g * st.tokens_pad;
      __m512 vmax = _mm512_set1_ps(neg_inf);
      for (int64_t t0 = 0; t0 < n; t0 += 16)
        vmax = _mm512_mask_max_ps(vmax, lane_mask(n - t0), vmax, _mm512_loadu_ps(s + t0));
      const float m_new = std::max(st.m[g], vec::reduce_max(vmax));
      const __m512 m_v = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      bf16_t* probs = st.probs.data() + g * st.tokens_pad;
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        // Lane n must be exactly zero: p.v pairs an odd last token with it (an odd n is never
        // a multiple of 16, so lane n falls in this loop's last vector).
        const __mmask16 mask = lane_mask(n - t0);
        const __m512 p =
            _mm512_maskz_mov_ps(mask, vec::exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t0), m_v)));
        sum = _mm512_add_ps(sum, p);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + t0), (__m256i)_mm512_cvtneps_pbh(p));
      }
      const float alpha = st.m[g] == neg_inf ? 0.0f : std::exp(st.m[g] - m_new);
      if (alpha != 1.0f) {
        float* acc = st.acc.data() + g * st.dim_pad;
        const __m512 alpha_v = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < st.dim_pad; d += 16)
          _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), alpha_v));
      }
      st.l[g] = st.l[g] * alpha + vec::reduce_add(sum);
      st.m[g] = m_new;
    }
  }

  static __mmask16 lane_mask(int64_t remaining) {
    return remaining >= 16 ? static_cast<__mmask16>(0xffff)
                           : static_cast<__mmask16>((1u << remaining) - 1);
  }

  // acc[g0 .. g0+GT)[chunks c0 .. c0+NC) += sum_t p[g][t] * v_t, two tokens per dpbf16
  // (see the pair-interleaved layout in vec_avx512.h). GT * NC * 2 accumulators stay in
  // registers for the whole block.
  template <int GT, int NC>
  static void accumulate_pv(DecodeState& st, const bf16_t* values, int64_t stride, int64_t n,
                            int64_t g0, int64_t c0) {
    __m512 acc[GT][NC][2];
    float* acc_ptr[GT];
    const uint32_t* pairs[GT];
    for (int g = 0; g < GT; ++g) {
      acc_ptr[g] = st.acc.data() + (g0 + g) * st.dim_pad + 32 * c0;
      pairs[g] = reinterpret_cast<const uint32_t*>(st.probs.data() + (g0 + g) * st.tokens_pad);
      for (int c = 0; c < NC; ++c) {
        acc[g][c][0] = _mm512_loadu_ps(acc_ptr[g] + 32 * c);
        acc[g][c][1] = _mm512_loadu_ps(acc_ptr[g] + 32 * c + 16);
      }
    }
    int counts[NC];
    for (int c = 0; c < NC; ++c)
      counts[c] = static_cast<int>(std::min<int64_t>(32, st.head_dim - 32 * (c0 + c)));
    auto step = [&](int64_t k, bool has_second) {
      const bf16_t* first = values + 2 * k * stride + 32 * c0;
      __m512i lo[NC], hi[NC];
      for (int c = 0; c < NC; ++c) {
        const __m512i a = vec::load_bf16x32(first + 32 * c, counts[c]);
        const __m512i b =
            has_second ? vec::load_bf16x32(first + stride + 32 * c, counts[c]) : _mm512_setzero_si512();
        lo[c] = _mm512_unpacklo_epi16(a, b);
        hi[c] = _mm512_unpackhi_epi16(a, b);
      }
      for (int g = 0; g < GT; ++g) {
        const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[g][k]));
        for (int c = 0; c < NC; ++c) {
          acc[g][c][0] = _mm512_dpbf16_ps(acc[g][c][0], (__m512bh)lo[c], p);
          acc[g][c][1] = _mm512_dpbf16_ps(acc[g][c][1], (__m512bh)hi[c], p);
        }
      }
    };
    const int64_t full_pairs = n / 2;
    for (int64_t k = 0; k < full_pairs; ++k) step(k, true);
    if (n % 2) step(full_pairs, false);
    for (int g = 0; g < GT; ++g)
      for (int c = 0; c < NC; ++c) {
        _mm512_storeu_ps(acc_ptr[g] + 32 * c, acc[g][c][0]);
        _mm512_storeu_ps(acc_ptr[g] + 32 * c + 16, acc[g][c][1]);
      }
  }
};

#endif  // PROTOSERVE_AVX512_BF16

}  // namespace protoserve
