// Fused bfloat16 pointwise ops of a decoder layer: RMSNorm (optionally after the residual add;
// Llama's or Gemma's), per-head q/k RMSNorm, SiLU- and GELU(tanh)-and-mul, rotary embedding. Each replaces 4-8 torch ops, whose per-op dispatch costs
// more than the arithmetic at decode batch sizes.
//
// Every op rounds to bfloat16 exactly where the torch expression it replaces does (each torch
// op on bf16 tensors computes in fp32 and rounds its result), so outputs match the reference
// model bit for bit except where a reduction's fp32 summation order or exp's last bit flips a
// rounding (rare, and within one bf16 ulp).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "vec_avx512.h"

namespace protoserve {
namespace {

inline float round_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }

// Rows per parallel chunk: decode-sized calls run inline on the calling thread.
int64_t row_grain(int64_t row_elements) {
  constexpr int64_t kElementsPerChunk = 32768;
  return std::max<int64_t>(1, kElementsPerChunk / std::max<int64_t>(row_elements, 1));
}

// out = weight * bf16(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm; with
// `gemma`, bf16(x * rsqrt(...) * (1 + weight)) in fp32, as Gemma2RMSNorm. `out` may be `x`.
void norm_row(const bf16_t* x, const bf16_t* weight, bf16_t* out, int64_t hidden, float eps,
              bool gemma) {
  float sum_squares = 0.0f;
#pragma omp simd reduction(+ : sum_squares)
  for (int64_t i = 0; i < hidden; ++i) {
    const float v = bf16_to_float(x[i]);
    sum_squares += v * v;
  }
  const float inv_rms = 1.0f / std::sqrt(sum_squares / static_cast<float>(hidden) + eps);
  if (gemma) {
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i)
      out[i] = float_to_bf16(bf16_to_float(x[i]) * inv_rms * (1.0f + bf16_to_float(weight[i])));
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) {
    const float normed = round_bf16(bf16_to_float(x[i]) * inv_rms);
    out[i] = float_to_bf16(bf16_to_float(weight[i]) * normed);
  }
}

}  // namespace

void rms_norm_bf16(const NormArgs& a) {
  protoserve::work_pool::parallel_for(0, a.num_tokens, row_grain(a.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      bf16_t* residual = a.residual + t * a.residual_stride;
      if (a.delta != nullptr) {
        // residual += delta, rounded like the reference's `hidden + attn_output`.
        const bf16_t* delta = a.delta + t * a.delta_stride;
#pragma omp simd
        for (int64_t i = 0; i < a.hidden; ++i)
          residual[i] = float_to_bf16(bf16_to_float(residual[i]) + bf16_to_float(delta[i]));
      }
      norm_row(residual, a.weight, a.out + t * a.hidden, a.hidden, a.eps, a.gemma);
    }
  });
}

void head_norm_bf16(const HeadNormArgs& a) {
  const int64_t dim = a.head_dim;
  protoserve::work_pool::parallel_for(0, a.num_tokens, row_grain(a.num_heads * dim),
                                      [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < a.num_heads; ++h) {
        bf16_t* head = a.x + t * a.token_stride + h * dim;
        norm_row(head, a.weight, head, dim, a.eps, a.gemma);
      }
  });
}

#if PROTOSERVE_AVX512_BF16
// 16 lanes at a time; vcvtneps2bf16 rounds to nearest even like torch, and exp_ps is within
// ~2e-7 of expf, so a rounding flips only where the exact value sits on a bf16 tie boundary.
static void silu_and_mul_row(const bf16_t* gate, const bf16_t* up, bf16_t* out,
                             int64_t width) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < width; i += 16) {
    const int64_t lanes = std::min<int64_t>(16, width - i);
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
    const __m512 g = vec::bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, gate + i));
    const __m512 u = vec::bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, up + i));
    const __m512 exp_neg = vec::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_neg));
    const __m512 activated = vec::bf16x16_to_ps((__m256i)_mm512_cvtneps_pbh(silu));
    const __m512 product = _mm512_mul_ps(activated, u);
    _mm256_mask_storeu_epi16(out + i, mask, (__m256i)_mm512_cvtneps_pbh(product));
  }
}
#endif

#if PROTOSERVE_AVX512_BF16
// gelu_tanh(g) = 0.5 g (1 + tanh(u)), u = sqrt(2 / pi) (g + 0.044715 g^3), in torch's form
// (so where 1 + tanh(u) cancels to 0 for g below ~-5.3, so does this). Rounded like
// silu_and_mul_row.
static void gelu_tanh_and_mul_row(const bf16_t* gate, const bf16_t* up, bf16_t* out,
                                  int64_t width) {
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512 two_beta = _mm512_set1_ps(2.0f * 0.7978845608028654f);
  const __m512 kappa = _mm512_set1_ps(0.044715f);
  for (int64_t i = 0; i < width; i += 16) {
    const int64_t lanes = std::min<int64_t>(16, width - i);
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
    const __m512 g = vec::bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, gate + i));
    const __m512 u = vec::bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, up + i));
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    const __m512 inner = _mm512_add_ps(g, _mm512_mul_ps(kappa, cube));
    // exp overflows to inf for large u: 2 / inf = 0 and tanh = 1, as it should.
    const __m512 exp_2u = vec::exp_ps(_mm512_mul_ps(two_beta, inner));
    // tanh = 1 - 2 r for u >= 0 and 2 e r - 1 below, r = 1 / (1 + e): each rounds once near
    // -1 and 1, as a correctly rounded tanhf does, so 1 + tanh cancels where torch's does.
    const __m512 r = _mm512_div_ps(one, _mm512_add_ps(one, exp_2u));
    const __mmask16 negative = _mm512_cmp_ps_mask(inner, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 tanh = _mm512_mask_blend_ps(
        negative, _mm512_fnmadd_ps(two, r, one),
        _mm512_sub_ps(_mm512_mul_ps(_mm512_mul_ps(two, exp_2u), r), one));
    const __m512 gelu = _mm512_mul_ps(_mm512_mul_ps(half, g), _mm512_add_ps(one, tanh));
    const __m512 activated = vec::bf16x16_to_ps((__m256i)_mm512_cvtneps_pbh(gelu));
    _mm256_mask_storeu_epi16(out + i, mask,
                             (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(activated, u)));
  }
}
#endif

void gelu_tanh_and_mul_bf16(const SiluMulArgs& a) {
  const int64_t width = a.intermediate;
  protoserve::work_pool::parallel_for(0, a.num_tokens, row_grain(width),
                                      [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16_t* gate = a.gate_up + t * a.gate_up_stride;
      const bf16_t* up = gate + width;
      bf16_t* out = a.out + t * width;
#if PROTOSERVE_AVX512_BF16
      gelu_tanh_and_mul_row(gate, up, out, width);
      continue;
#endif
      for (int64_t i = 0; i < width; ++i) {
        const float g = bf16_to_float(gate[i]);
        const float inner = 0.7978845608028654f * (g + 0.044715f * (g * g * g));
        const float activated = round_bf16(0.5f * g * (1.0f + std::tanh(inner)));
        out[i] = float_to_bf16(activated * bf16_to_float(up[i]));
      }
    }
  });
}

void silu_and_mul_bf16(const SiluMulArgs& a) {
  const int64_t width = a.intermediate;
  protoserve::work_pool::parallel_for(0, a.num_tokens, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16_t* gate = a.gate_up + t * a.gate_up_stride;
      const bf16_t* up = gate + width;
      bf16_t* out = a.out + t * width;
#if PROTOSERVE_AVX512_BF16
      silu_and_mul_row(gate, up, out, width);
      continue;
#endif
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float g = bf16_to_float(gate[i]);
        const float activated = round_bf16(g / (1.0f + std::exp(-g)));  // F.silu, rounded
        out[i] = float_to_bf16(activated * bf16_to_float(up[i]));
      }
    }
  });
}

void rotary_bf16(const RotaryArgs& a) {
  const int64_t dim = a.head_dim;
  const int64_t half = dim / 2;
  protoserve::work_pool::parallel_for(0, a.num_tokens, row_grain(a.num_heads * dim), [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim);
    for (int64_t t = begin; t < end; ++t) {
      const bf16_t* cos = a.cos + t * dim;
      const bf16_t* signed_sin = a.signed_sin + t * dim;
      for (int64_t h = 0; h < a.num_heads; ++h) {
        bf16_t* x = a.x + t * a.token_stride + h * dim;
        for (int64_t d = 0; d < dim; ++d) row[d] = bf16_to_float(x[d]);
        // x * cos + roll(x, dim / 2) * signed_sin, each product and the sum rounded.
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) {
          const float rolled = row[d < half ? d + half : d - half];
          const float a_term = round_bf16(row[d] * bf16_to_float(cos[d]));
          const float b_term = round_bf16(rolled * bf16_to_float(signed_sin[d]));
          x[d] = float_to_bf16(a_term + b_term);
        }
      }
    }
  });
}

}  // namespace protoserve
