// AVX-512 building blocks for the bf16 attention kernels (only compiled with AVX512_BF16).
//
// The "pair-interleaved" layout used for P.V products. `_mm512_dpbf16_ps(acc, a, b)` adds
// a[2i]*b[2i] + a[2i+1]*b[2i+1] into fp32 lane i. Interleaving two value rows v_t, v_u (32 bf16
// each) with unpacklo/unpackhi_epi16 gives, per 128-bit lane L (0..3) and j (0..3):
//
//     lo lane 4L+j = (v_t[8L+j],   v_u[8L+j])        -> output dim d = 8L + j
//     hi lane 4L+j = (v_t[8L+4+j], v_u[8L+4+j])      -> output dim d = 8L + 4 + j
//
// so with b = broadcast (p_t, p_u) one dpbf16 adds p_t*v_t[d] + p_u*v_u[d] for 16 dims.
// Accumulators stay in this permuted order for a whole sequence; `deinterleave` restores the
// natural order once at the end.
#pragma once

#include "cpu_types.h"

#if PROTOSERVE_AVX512_BF16

namespace protoserve::vec {

inline __m512 exp_ps(__m512 x) {
  // exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2; degree-6 Taylor polynomial
  // (relative error ~2e-7). Inputs below -100 underflow to ~0; -inf is clamped the same way.
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Sixteen vectors in, one out: lane i = horizontal sum of v[i].
//
// In-lane shuffles first: on Zen 4 they issue beside dpbf16, lane-crossing ones compete with
// it (6 dpbf16 + 6 vshufps: ~6 cycles; + 6 vshuff32x4: ~10). Per 128-bit lane L:
//   round 1, unpacklo/hi_ps (v[2j], v[2j+1]):  [a0+a2  b0+b2  a1+a3  b1+b3]
//   round 2, shuffle_ps pairs of those:        [a  b  c  d]   each one lane L's partial sum
// then two lane-crossing rounds add the four 128-bit lanes:
//   round 3  [A.L0+L1  A.L2+L3  B.L0+L1  B.L2+L3]  (A = round-2 vector 0, B = vector 1, ...)
//   round 4  [A  B  C  D]
// so 128-bit lane k holds v[4k .. 4k+3]: 6 lane-crossing shuffles instead of 25.
inline __m512 hsum16(const __m512* v) {
  __m512 r1[8];
  for (int i = 0; i < 8; ++i)
    r1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                          _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 r2[4];
  for (int i = 0; i < 4; ++i)
    r2[i] = _mm512_add_ps(_mm512_shuffle_ps(r1[2 * i], r1[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_ps(r1[2 * i], r1[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 r3[2];
  for (int i = 0; i < 2; ++i)
    r3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r2[2 * i], r2[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(r2[2 * i], r2[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(r3[0], r3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(r3[0], r3[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Masked load of up to 32 bf16 (missing lanes read as zero, never touching memory).
inline __m512i load_bf16x32(const bf16_t* ptr, int count) {
  if (count >= 32) return _mm512_loadu_si512(ptr);
  return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << count) - 1), ptr);
}

inline __m512 bf16x16_to_ps(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Undo the pair-interleaved order of one 32-dim chunk: out[0..32) in natural order.
inline void deinterleave(__m512 lo, __m512 hi, float* out) {
  // Natural dim d = 8L + r: r < 4 comes from lo lane 4L + r, else from hi lane 4L + r - 4
  // (index 16 + ... selects the second operand of permutex2var).
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo, second, hi));
}

// Packs fp32 probabilities of two tokens into 16 (p_t, p_u) bf16 pairs, one per 32-bit lane.
inline __m512i pack_pairs(__m512 p_t, __m512 p_u) {
  const __m512i t = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p_t));
  const __m512i u = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p_u));
  return _mm512_or_si512(t, _mm512_slli_epi32(u, 16));
}

inline float reduce_max(__m512 v) { return _mm512_reduce_max_ps(v); }
inline float reduce_add(__m512 v) { return _mm512_reduce_add_ps(v); }

}  // namespace protoserve::vec

#endif  // PROTOSERVE_AVX512_BF16
