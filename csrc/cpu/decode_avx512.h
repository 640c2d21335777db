// The bf16 decode kernel on AVX512_BF16 (the two-pass scheme of decode_kernels.h): q.k and
// p.v both run on `_mm512_dpbf16_ps` (bf16 products, fp32 sums). Probabilities are rounded to
// bf16 for p.v, as the reference does before its matmul.
//
// Cost model (Zen 4, d 128, GQA 4): per (token, kv head) 16 dpbf16 for q.k and 16 for p.v, at
// most one a cycle, against 512 bytes of K/V. Everything else should issue beside them:
// in-lane shuffles and adds do, lane-crossing shuffles share the dpbf16 pipes, hence
// vec::hsum16's order. Each K/V row is loaded once per kv head and used by all its query
// heads while it is in L1.
//
// Both passes also take `prefetch`: the region decode_attention.cpp wants in L2 next (one row
// of head_dim elements per key computed here, see there), issued a tile at a time so the
// misses stay in flight while the tiles compute.
#pragma once

#include "decode_kernels.h"
#include "vec_avx512.h"

#if PROTOSERVE_AVX512_BF16

namespace protoserve {

struct Avx512Bf16Decode {
  static void load_query(DecodeState& st, const bf16_t* query, int64_t head_stride) {
    for (int64_t h = 0; h < st.num_heads; ++h)
      std::memcpy(st.query_bf16.data() + h * st.dim_pad, query + h * head_stride,
                  st.head_dim * sizeof(bf16_t));
  }

  // Heads [head0, head0 + group) over the n keys of one block of their kv head, in register
  // tiles of GT heads x TB = 16 / GT keys. Two heads per tile halve the key loads (2 * NCH
  // query registers + 16 sums fit the 32 vector registers up to head_dim 128). Key tiles are
  // the outer loop: every head tile of the group runs on a tile's 8 rows while they are in
  // L1. (At a power-of-two token stride, 2 KiB for 8 x 128 bf16, a kv head's rows share a
  // few L1 sets: a whole block's 16 would fill them.) Measured cold, this order beats heads
  // outer by ~10%.
  static void scores(DecodeState& st, int64_t head0, int64_t group, const bf16_t* keys,
                     int64_t stride, int64_t n, int64_t offset, float scale,
                     const bf16_t* prefetch) {
    const int nch = st.head_dim == 64 ? 2 : st.head_dim == 128 ? 4 : st.head_dim == 256 ? 8 : 0;
    if (nch == 0) {
      prefetch_rows(prefetch, st.head_dim, 0, n);
      scores_any(st, keys, stride, 0, n, head0, head0 + group, offset, scale);
      return;
    }
    const int gt = nch <= 4 && group % 2 == 0 ? 2 : 1;
    const int64_t tb = 16 / gt;
    int64_t t0 = 0;
    for (; t0 + tb <= n; t0 += tb) {
      prefetch_rows(prefetch, st.head_dim, t0, t0 + tb);
      const bf16_t* rows = keys + t0 * stride;
      for (int64_t g0 = head0; g0 < head0 + group; g0 += gt) {
        switch (gt * 16 + nch) {
          case 16 + 2: scores_tile<1, 2>(st, rows, stride, g0, offset + t0, scale); break;
          case 16 + 4: scores_tile<1, 4>(st, rows, stride, g0, offset + t0, scale); break;
          case 16 + 8: scores_tile<1, 8>(st, rows, stride, g0, offset + t0, scale); break;
          case 32 + 2: scores_tile<2, 2>(st, rows, stride, g0, offset + t0, scale); break;
          default: scores_tile<2, 4>(st, rows, stride, g0, offset + t0, scale); break;
        }
      }
    }
    if (t0 < n) {
      prefetch_rows(prefetch, st.head_dim, t0, n);
      scores_any(st, keys, stride, t0, n, head0, head0 + group, offset, scale);
    }
  }

  static void softmax(DecodeState& st, int64_t n) {
    for (int64_t h = 0; h < st.num_heads; ++h) {
      const float* s = st.scores.data() + h * st.part_pad;
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t t0 = 0; t0 < n; t0 += 16)
        vmax = _mm512_mask_max_ps(vmax, lane_mask(n - t0), vmax, _mm512_loadu_ps(s + t0));
      const float m = vec::reduce_max(vmax);
      const __m512 m_v = _mm512_set1_ps(m);
      __m512 sum = _mm512_setzero_ps();
      bf16_t* probs = st.probs.data() + h * st.part_pad;
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const __m512 p = _mm512_maskz_mov_ps(
            lane_mask(n - t0), vec::exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t0), m_v)));
        sum = _mm512_add_ps(sum, p);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + t0), (__m256i)_mm512_cvtneps_pbh(p));
      }
      st.m[h] = m;
      st.l[h] = vec::reduce_add(sum);
    }
    std::fill(st.acc.begin(), st.acc.end(), 0.0f);
  }

  // acc[h] += sum_t p[h][t] v_t for the group's heads, in register tiles of up to 4 heads x
  // 2 dim chunks (16 sums).
  static void accumulate(DecodeState& st, int64_t head0, int64_t group, const bf16_t* values,
                         int64_t stride, int64_t n, int64_t offset, const bf16_t* prefetch) {
    prefetch_rows(prefetch, st.head_dim, 0, n);
    const int64_t num_chunks = st.dim_pad / 32;
    for (int64_t c0 = 0; c0 < num_chunks; c0 += 2) {
      const bool two = c0 + 1 < num_chunks;
      for (int64_t g0 = head0; g0 < head0 + group; g0 += 4) {
        const int64_t gt = std::min<int64_t>(4, head0 + group - g0);
        switch (gt * 2 + (two ? 1 : 0)) {
          case 2: accumulate_pv<1, 1>(st, values, stride, n, offset, g0, c0); break;
          case 3: accumulate_pv<1, 2>(st, values, stride, n, offset, g0, c0); break;
          case 4: accumulate_pv<2, 1>(st, values, stride, n, offset, g0, c0); break;
          case 5: accumulate_pv<2, 2>(st, values, stride, n, offset, g0, c0); break;
          case 6: accumulate_pv<3, 1>(st, values, stride, n, offset, g0, c0); break;
          case 7: accumulate_pv<3, 2>(st, values, stride, n, offset, g0, c0); break;
          case 8: accumulate_pv<4, 1>(st, values, stride, n, offset, g0, c0); break;
          default: accumulate_pv<4, 2>(st, values, stride, n, offset, g0, c0); break;
        }
      }
    }
  }

  static void finish(DecodeState& st, float* natural) {
    for (int64_t h = 0; h < st.num_heads; ++h) {
      const float* acc = st.acc.data() + h * st.dim_pad;
      for (int64_t c = 0; c < st.dim_pad; c += 32)
        vec::deinterleave(_mm512_loadu_ps(acc + c), _mm512_loadu_ps(acc + c + 16),
                          natural + h * st.dim_pad + c);
    }
  }

 private:
  static __mmask16 lane_mask(int64_t remaining) {
    return remaining >= 16 ? static_cast<__mmask16>(0xffff)
                           : static_cast<__mmask16>((1u << remaining) - 1);
  }

  // Lanes of the 32-dim chunk c that exist (the last chunk of an odd-sized head is partial).
  static __mmask32 chunk_mask(int64_t head_dim, int64_t c) {
    const int64_t count = std::min<int64_t>(32, head_dim - 32 * c);
    return count >= 32 ? static_cast<__mmask32>(0xffffffffu)
                       : static_cast<__mmask32>((1u << count) - 1);
  }

  // Rows [t_begin, t_end) of the prefetch region (head_dim elements each, contiguous) into
  // L2. Nothing when region is null.
  static void prefetch_rows(const bf16_t* region, int64_t head_dim, int64_t t_begin,
                            int64_t t_end) {
    if (region == nullptr) return;
    const char* end = reinterpret_cast<const char*>(region + t_end * head_dim);
    for (const char* line = reinterpret_cast<const char*>(region + t_begin * head_dim);
         line < end; line += 64)
      _mm_prefetch(line, _MM_HINT_T1);
  }

  // Heads g0 .. g0+GT over TB = 16 / GT keys, head_dim = 32 * NCH. One dpbf16 sum per
  // (key, head) pair, 16 in all, folded by hsum16 into lanes [head][key]:
  //   lane g * TB + t = q_{g0+g} . k_t
  template <int GT, int NCH>
  static void scores_tile(DecodeState& st, const bf16_t* rows, int64_t stride, int64_t g0,
                          int64_t offset, float scale) {
    constexpr int TB = 16 / GT;
    __m512bh q[GT][NCH];
    for (int g = 0; g < GT; ++g)
      for (int c = 0; c < NCH; ++c)
        q[g][c] = (__m512bh)_mm512_loadu_si512(st.query_bf16.data() + (g0 + g) * st.dim_pad +
                                               32 * c);
    __m512 acc[16];
    const bf16_t* row = rows;
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t, row += stride) {
      __m512 sum[GT];
      for (int g = 0; g < GT; ++g) sum[g] = _mm512_setzero_ps();
      for (int c = 0; c < NCH; ++c) {
        const __m512bh k = (__m512bh)_mm512_loadu_si512(row + 32 * c);
        for (int g = 0; g < GT; ++g) sum[g] = _mm512_dpbf16_ps(sum[g], k, q[g][c]);
      }
      for (int g = 0; g < GT; ++g) acc[g * TB + t] = sum[g];
    }
    const __m512 s = _mm512_mul_ps(vec::hsum16(acc), _mm512_set1_ps(scale));
    if constexpr (GT == 1) {
      _mm512_storeu_ps(st.scores.data() + g0 * st.part_pad + offset, s);
    } else {
      _mm256_storeu_ps(st.scores.data() + g0 * st.part_pad + offset, _mm512_castps512_ps256(s));
      _mm256_storeu_ps(st.scores.data() + (g0 + 1) * st.part_pad + offset,
                       _mm512_extractf32x8_ps(s, 1));
    }
  }

  // Keys [t_begin, n) of a block for heads [g_begin, g_end), any head_dim: masked loads, 16
  // keys at a time; rows past n repeat row n - 1 (valid memory) and are not stored.
  static void scores_any(DecodeState& st, const bf16_t* keys, int64_t stride, int64_t t_begin,
                         int64_t n, int64_t g_begin, int64_t g_end, int64_t offset, float scale) {
    const int64_t num_chunks = st.dim_pad / 32;
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int64_t g = g_begin; g < g_end; ++g) {
      const bf16_t* q = st.query_bf16.data() + g * st.dim_pad;
      for (int64_t t0 = t_begin; t0 < n; t0 += 16) {
        __m512 acc[16];
        for (int t = 0; t < 16; ++t) {
          const bf16_t* row = keys + std::min<int64_t>(t0 + t, n - 1) * stride;
          __m512 sum = _mm512_setzero_ps();
          for (int64_t c = 0; c < num_chunks; ++c) {
            const __m512i k = _mm512_maskz_loadu_epi16(chunk_mask(st.head_dim, c), row + 32 * c);
            sum = _mm512_dpbf16_ps(sum, (__m512bh)k, (__m512bh)_mm512_loadu_si512(q + 32 * c));
          }
          acc[t] = sum;
        }
        _mm512_mask_storeu_ps(st.scores.data() + g * st.part_pad + offset + t0, lane_mask(n - t0),
                              _mm512_mul_ps(vec::hsum16(acc), scale_v));
      }
    }
  }

  // acc[g0 .. g0+GT)[chunks c0 .. c0+NC) += sum_t p[g][offset + t] * v_t, two tokens per
  // dpbf16 (pair-interleaved layout, vec_avx512.h). The GT * NC * 2 sums stay in registers
  // for the whole block; an odd n pairs the last token with zero_row.
  template <int GT, int NC>
  static void accumulate_pv(DecodeState& st, const bf16_t* values, int64_t stride, int64_t n,
                            int64_t offset, int64_t g0, int64_t c0) {
    __m512 acc[GT][NC][2];
    const bf16_t* probs[GT];
    for (int g = 0; g < GT; ++g) {
      const float* a = st.acc.data() + (g0 + g) * st.dim_pad + 32 * c0;
      probs[g] = st.probs.data() + (g0 + g) * st.part_pad + offset;
      for (int c = 0; c < NC; ++c) {
        acc[g][c][0] = _mm512_loadu_ps(a + 32 * c);
        acc[g][c][1] = _mm512_loadu_ps(a + 32 * c + 16);
      }
    }
    __mmask32 masks[NC];
    for (int c = 0; c < NC; ++c) masks[c] = chunk_mask(st.head_dim, c0 + c);
    const int64_t num_pairs = (n + 1) / 2;
    const bf16_t* row = values + 32 * c0;
    const bf16_t* zeros = st.zero_row.data() + 32 * c0;
    for (int64_t k = 0; k < num_pairs; ++k, row += 2 * stride) {
      const bf16_t* second = 2 * k + 1 < n ? row + stride : zeros;
      __m512i lo[NC], hi[NC];
      for (int c = 0; c < NC; ++c) {
        const __m512i a = _mm512_maskz_loadu_epi16(masks[c], row + 32 * c);
        const __m512i b = _mm512_maskz_loadu_epi16(masks[c], second + 32 * c);
        lo[c] = _mm512_unpacklo_epi16(a, b);
        hi[c] = _mm512_unpackhi_epi16(a, b);
      }
      for (int g = 0; g < GT; ++g) {
        // (p_2k, p_2k+1) as one 32-bit word, p_2k in the low half like the unpacked rows,
        // broadcast straight from memory. For an odd n the high half is the next token's
        // probability (finite, inside the buffer), which meets zero_row: its product is 0.
        int32_t pair;
        std::memcpy(&pair, probs[g] + 2 * k, sizeof(pair));
        const __m512bh p = (__m512bh)_mm512_set1_epi32(pair);
        for (int c = 0; c < NC; ++c) {
          acc[g][c][0] = _mm512_dpbf16_ps(acc[g][c][0], (__m512bh)lo[c], p);
          acc[g][c][1] = _mm512_dpbf16_ps(acc[g][c][1], (__m512bh)hi[c], p);
        }
      }
    }
    for (int g = 0; g < GT; ++g) {
      float* a = st.acc.data() + (g0 + g) * st.dim_pad + 32 * c0;
      for (int c = 0; c < NC; ++c) {
        _mm512_storeu_ps(a + 32 * c, acc[g][c][0]);
        _mm512_storeu_ps(a + 32 * c + 16, acc[g][c][1]);
      }
    }
  }
};

}  // namespace protoserve

#endif  // PROTOSERVE_AVX512_BF16
