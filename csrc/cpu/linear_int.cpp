// linear_int: out[M, N] = x[M, K] . dequant(Q)[N, K]^T (+ bias), x and out bfloat16, Q int8 or
// int4 with fp32 scales per (row, group of group_size columns).
//
// Decode streams every weight once per step, so fewer bytes per weight is the speed-up; the
// multiply stays the AVX512_BF16 pair-column dot product of linear_bf16 (panel_gemm_avx512.h)
// over the same panel order, with each weight vector dequantized in registers first:
//
//   int8: packed[p, k2, 2 r + j]             = Q[16 p + r, 2 k2 + j]      (signed bytes)
//   int4: packed[p, k2, b] low nibble         = Q[16 p + b / 2,     2 k2 + b % 2] + 8
//                          high nibble        = Q[16 p + 8 + b / 2, 2 k2 + b % 2] + 8
//   scales[p, g, r]                           = scale[16 p + r, g]
//
// A pair's 32 weights become two vectors of 16 fp32 lanes (rows 0-7 and rows 8-15 of the
// panel, two columns each), are multiplied by their rows' scales and rounded to bfloat16 as
// one __m512bh: exactly torch's `(Q.float() * scale).to(bfloat16)`, so the only difference
// from a dequantize-then-matmul in bfloat16 is the fp32 summation order. Scales change at
// group boundaries only and are broadcast to pairs once per group.
#include <algorithm>

#include "cpu_types.h"
#include "linear_int.h"
#include "panel_gemm_avx512.h"

namespace protoserve {

#if PROTOSERVE_AVX512_BF16
namespace {

using panel_gemm::kPanelRows;

// Bytes of one panel's pair of columns (32 weights).
template <int BITS>
constexpr int64_t kPairBytes = 32 * BITS / 8;

template <int BITS>
inline __m512bh dequantize_pair(const uint8_t* pair, __m512 scale_lo, __m512 scale_hi) {
  __m512i lo, hi;
  if constexpr (BITS == 8) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair));
    lo = _mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes));
    hi = _mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1));
  } else {
    const __m512i bytes =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair)));
    const __m512i offset = _mm512_set1_epi32(8);
    lo = _mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF)), offset);
    hi = _mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), offset);
  }
  const __m512 w_lo = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), scale_lo);
  const __m512 w_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(hi), scale_hi);
  return _mm512_cvtne2ps_pbh(w_hi, w_lo);  // w_lo in the low 16 lanes
}

struct IntRun {
  const uint8_t* weight;
  const float* scales;
  int64_t in_features;
  int64_t group_size;
  int64_t num_groups;
  const bf16_t* input;
  int64_t input_stride;
  int64_t num_tokens;
};

// NP panels x MT tokens from token m0, as panel_gemm::tile, group by group.
template <int BITS, int NP, int MT, typename Epilogue>
inline void tile(const IntRun& run, int64_t panel0, int64_t num_panels, int64_t m0,
                 Epilogue& epilogue) {
  constexpr int64_t pair_bytes = kPairBytes<BITS>;
  // Prefetch one cache line per 64 bytes streamed, ~4 KiB ahead as linear_bf16 does.
  constexpr int64_t pairs_per_line = 64 / pair_bytes;
  constexpr int64_t prefetch_bytes = 4096;
  const int64_t pairs = run.in_features / 2;
  const int64_t panel_stride = pairs * pair_bytes;
  const __m512i rows_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i rows_hi = _mm512_add_epi32(rows_lo, _mm512_set1_epi32(8));
  __m512 acc[NP][MT];
  for (int p = 0; p < NP; ++p)
    for (int t = 0; t < MT; ++t) acc[p][t] = _mm512_setzero_ps();
  int64_t panel_index[NP];
  const uint8_t* panels[NP];
  for (int p = 0; p < NP; ++p) {
    panel_index[p] = panel0 + std::min<int64_t>(p, num_panels - 1);  // in bounds, unused
    panels[p] = run.weight + panel_index[p] * panel_stride;
  }
  const int32_t* x_rows[MT];
  for (int t = 0; t < MT; ++t)
    x_rows[t] = reinterpret_cast<const int32_t*>(run.input + (m0 + t) * run.input_stride);
  const bool prefetch = m0 == 0;

  const int64_t group_pairs = run.group_size / 2;
  for (int64_t g = 0; g < run.num_groups; ++g) {
    __m512 scale_lo[NP], scale_hi[NP];
    for (int p = 0; p < NP; ++p) {
      const __m512 s = _mm512_loadu_ps(run.scales + (panel_index[p] * run.num_groups + g) * 16);
      scale_lo[p] = _mm512_permutexvar_ps(rows_lo, s);
      scale_hi[p] = _mm512_permutexvar_ps(rows_hi, s);
    }
    const int64_t k2_end = std::min(pairs, (g + 1) * group_pairs);
    for (int64_t k2 = g * group_pairs; k2 < k2_end; ++k2) {
      __m512bh wv[NP];
      for (int p = 0; p < NP; ++p) {
        const uint8_t* vec = panels[p] + k2 * pair_bytes;
        if (prefetch && k2 % pairs_per_line == 0)
          __builtin_prefetch(vec + prefetch_bytes, 0, panel_gemm::kPrefetchLocality);
        wv[p] = dequantize_pair<BITS>(vec, scale_lo[p], scale_hi[p]);
      }
      for (int t = 0; t < MT; ++t) {
        const __m512bh x_pair = (__m512bh)_mm512_set1_epi32(x_rows[t][k2]);
        for (int p = 0; p < NP; ++p) acc[p][t] = _mm512_dpbf16_ps(acc[p][t], wv[p], x_pair);
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    __m512 sums[NP];
    for (int p = 0; p < NP; ++p) sums[p] = acc[p][t];
    epilogue(m0 + t, sums);
  }
}

template <int BITS, int NP, int MT, typename Epilogue>
inline void token_tiles(const IntRun& run, int64_t panel0, int64_t num_panels,
                        Epilogue& epilogue) {
  int64_t m0 = 0;
  for (; m0 + MT <= run.num_tokens; m0 += MT)
    tile<BITS, NP, MT>(run, panel0, num_panels, m0, epilogue);
  const int64_t rest = run.num_tokens - m0;
  if (rest == 0) return;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((rest == R + 1 ? tile<BITS, NP, R + 1>(run, panel0, num_panels, m0, epilogue) : void()),
     ...);
  }(std::make_integer_sequence<int, MT - 1>{});
}

template <int BITS, int NP, int MT>
void run(const LinearIntArgs& args) {
  const int64_t num_panels = ceil_div(args.out_features, kPanelRows);
  const int64_t num_groups_of_panels = ceil_div(num_panels, NP);
  const IntRun gemm{args.packed_weight,
                    args.scales,
                    args.in_features,
                    args.group_size,
                    ceil_div(args.in_features, args.group_size),
                    static_cast<const bf16_t*>(args.input),
                    args.input_stride,
                    args.num_tokens};
  const bf16_t* bias = static_cast<const bf16_t*>(args.bias);
  bf16_t* output = static_cast<bf16_t*>(args.output);
  at::parallel_for(0, num_groups_of_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t panel0 = g * NP;
      const int64_t group_panels = std::min<int64_t>(NP, num_panels - panel0);
      auto store = [&](int64_t m, const __m512* sums) {
        for (int64_t p = 0; p < group_panels; ++p) {
          const int64_t n0 = (panel0 + p) * kPanelRows;
          const __mmask16 mask = panel_gemm::row_mask(args.out_features - n0);
          __m512 value = sums[p];
          if (bias != nullptr)
            value = _mm512_add_ps(value,
                                  panel_gemm::from_bf16(_mm256_maskz_loadu_epi16(mask, bias + n0)));
          _mm256_mask_storeu_epi16(output + m * args.output_stride + n0, mask,
                                   panel_gemm::to_bf16(value));
        }
      };
      token_tiles<BITS, NP, MT>(gemm, panel0, group_panels, store);
    }
  });
}

// Tiles as linear_bf16's, narrower: each panel also holds two scale vectors per group.
template <int BITS>
void dispatch(const LinearIntArgs& args) {
  if (args.num_tokens == 1) {
    run<BITS, 8, 1>(args);
  } else if (args.num_tokens <= 4) {
    run<BITS, 3, 4>(args);
  } else {
    run<BITS, 2, 8>(args);
  }
}

}  // namespace

void linear_int(const LinearIntArgs& args) {
  if (args.bits == 8) {
    dispatch<8>(args);
  } else {
    dispatch<4>(args);
  }
}

#else

void linear_int(const LinearIntArgs&) {}  // never called: has_avx512_bf16() is false

#endif

}  // namespace protoserve
