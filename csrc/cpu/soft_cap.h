// Logit soft-capping for the attention kernels (Gemma 2's attn_logit_softcapping):
//
//   s -> C * tanh(s / C)      on scores already multiplied by the softmax scale
//
// Scores of attention are mostly small against C (|s / C| ~ 0.01 .. 0.5), where tanh through
// exp, (1 - e) / (1 + e) with e = exp(-2|x|), loses digits to the cancellation in 1 - e; an
// odd polynomial takes over there.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu_types.h"

#if PROTOSERVE_AVX512_BF16
#include "vec_avx512.h"
#endif

namespace protoserve {

#if PROTOSERVE_AVX512_BF16
// tanh on 16 lanes, relative error ~3e-7 (exp_ps's).
//   |x| < 0.3:  x (1 - x^2/3 + 2x^4/15 - 17x^6/315 + 62x^8/2835), next term < 6e-8 x
//   otherwise:  (1 - e) / (1 + e), e = exp(-2|x|) <= 0.55, so 1 - e keeps its digits
inline __m512 tanh_ps(__m512 x) {
  // Bit operations on the integer view (AVX512F; the _ps forms need AVX512DQ).
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i bits = _mm512_castps_si512(x);
  const __m512 a = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, bits));
  const __m512 a2 = _mm512_mul_ps(a, a);
  __m512 poly = _mm512_set1_ps(62.0f / 2835.0f);
  poly = _mm512_fmadd_ps(poly, a2, _mm512_set1_ps(-17.0f / 315.0f));
  poly = _mm512_fmadd_ps(poly, a2, _mm512_set1_ps(2.0f / 15.0f));
  poly = _mm512_fmadd_ps(poly, a2, _mm512_set1_ps(-1.0f / 3.0f));
  poly = _mm512_fmadd_ps(poly, a2, _mm512_set1_ps(1.0f));
  const __m512 small = _mm512_mul_ps(poly, a);
  const __m512 e = vec::exp_ps(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 large = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __mmask16 is_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.3f), _CMP_LT_OQ);
  const __m512 magnitude = _mm512_mask_blend_ps(is_small, large, small);
  return _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_castps_si512(magnitude), _mm512_and_si512(bits, sign_bit)));
}

inline __m512 soft_cap_ps(__m512 scores, __m512 cap, __m512 inv_cap) {
  return _mm512_mul_ps(cap, tanh_ps(_mm512_mul_ps(scores, inv_cap)));
}
#endif

// scores[0, n) = cap * tanh(scores / cap), in place.
inline void soft_cap_scores(float* scores, int64_t n, float cap) {
#if PROTOSERVE_AVX512_BF16
  const __m512 cap_v = _mm512_set1_ps(cap);
  const __m512 inv_cap = _mm512_set1_ps(1.0f / cap);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16)
    _mm512_storeu_ps(scores + t, soft_cap_ps(_mm512_loadu_ps(scores + t), cap_v, inv_cap));
  if (t < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(tail, scores + t);
    _mm512_mask_storeu_ps(scores + t, tail, soft_cap_ps(s, cap_v, inv_cap));
  }
#else
  for (int64_t t = 0; t < n; ++t) scores[t] = cap * std::tanh(scores[t] / cap);
#endif
}

}  // namespace protoserve
