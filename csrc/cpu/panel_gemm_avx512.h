// The bf16 GEMM micro-kernel over weights packed in "pair-column panels" (AVX512_BF16 only),
// shared by linear_bf16.cpp (one matrix) and moe_bf16.cpp (one matrix per expert):
//
//   packed[p, k2, r, j] = W[16 p + r, 2 k2 + j]      shape [ceil(N / 16), K / 2, 16, 2]
//
// One 64-byte vector of panel p at pair k2 holds rows 16p..16p+15, columns 2k2 and 2k2+1, so
// `_mm512_dpbf16_ps(acc, panel_vec, broadcast(x[m, 2k2], x[m, 2k2 + 1]))` adds the pair's
// contribution to 16 outputs of token m at once: no horizontal sums, and a panel is one
// contiguous run the hardware prefetchers stream at full bandwidth.
//
// A tile is NP panels x MT tokens of fp32 accumulators held in registers; the token loop sits
// inside the panel loop so each tile's weights (NP * 16 * K bf16, L2-sized) are read from
// memory once and re-read from cache by the following token tiles. What happens to the
// accumulators (rounding, bias, activation, routing weight) is the caller's epilogue, called
// once per token with that token's NP panel sums; each output is one accumulator summed in k
// order, so results do not depend on how callers split the panels between threads.
#pragma once

#include <algorithm>
#include <utility>

#include "cpu_types.h"

#if PROTOSERVE_AVX512_BF16

namespace protoserve::panel_gemm {

constexpr int kPanelRows = 16;
// Pairs ahead of the current one whose panel bytes are prefetched (4 KiB per panel), into L2
// (prefetcht1). A non-temporal prefetch (prefetchnta) streams ~30% slower on Zen 4: it fills
// L1 only, so the prefetches in flight are bounded by L1's few miss buffers, not L2's many.
constexpr int64_t kPrefetchPairs = 64;
constexpr int kPrefetchLocality = 2;  // __builtin_prefetch's 2 = prefetcht1

// Rows of x [num_tokens, in_features] (contiguous last dim) against panels [panel0, panel0 +
// num_panels) of one packed matrix whose first panel is `weight`.
struct PanelRun {
  const bf16_t* weight;
  int64_t in_features;
  const bf16_t* input;
  int64_t input_stride;  // elements between token rows
  int64_t num_tokens;
};

inline int64_t panel_elements(int64_t in_features) { return in_features * kPanelRows; }

// Accumulates MT tokens from m0 against `num_panels` (<= NP) consecutive panels, then calls
// `epilogue(m, sums)` per token with sums[NP] (only the first num_panels are meaningful).
// NP * MT accumulators plus NP weight vectors stay in the 32 zmm registers; x pairs are
// broadcast from L1 inside the multiply (a folded memory operand), not held in registers.
template <int NP, int MT, typename Epilogue>
inline void tile(const PanelRun& run, int64_t panel0, int64_t num_panels, int64_t m0,
                 Epilogue& epilogue) {
  const int64_t pairs = run.in_features / 2;
  const int64_t panel_stride = panel_elements(run.in_features);
  __m512 acc[NP][MT];
  for (int p = 0; p < NP; ++p)
    for (int t = 0; t < MT; ++t) acc[p][t] = _mm512_setzero_ps();

  // Missing panels (the last group of a matrix) alias the last real one: the loads stay in
  // bounds and their accumulators are never used.
  const bf16_t* panels[NP];
  for (int p = 0; p < NP; ++p)
    panels[p] = run.weight + (panel0 + std::min<int64_t>(p, num_panels - 1)) * panel_stride;
  const int32_t* x_rows[MT];
  for (int t = 0; t < MT; ++t)
    x_rows[t] = reinterpret_cast<const int32_t*>(run.input + (m0 + t) * run.input_stride);
  // Only the first token tile reads the panels from memory; later ones find them in cache.
  const bool prefetch = m0 == 0;

  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    __m512bh wv[NP];
    for (int p = 0; p < NP; ++p) {
      const bf16_t* vec = panels[p] + k2 * 2 * kPanelRows;
      if (prefetch) __builtin_prefetch(vec + kPrefetchPairs * 2 * kPanelRows, 0, kPrefetchLocality);
      wv[p] = (__m512bh)_mm512_loadu_si512(vec);
    }
    for (int t = 0; t < MT; ++t) {
      const __m512bh x_pair = (__m512bh)_mm512_set1_epi32(x_rows[t][k2]);
      for (int p = 0; p < NP; ++p) acc[p][t] = _mm512_dpbf16_ps(acc[p][t], wv[p], x_pair);
    }
  }

  for (int t = 0; t < MT; ++t) {
    __m512 sums[NP];
    for (int p = 0; p < NP; ++p) sums[p] = acc[p][t];
    epilogue(m0 + t, sums);
  }
}

// All tokens of `run` against one group of <= NP panels: full tiles of MT, then one smaller.
template <int NP, int MT, typename Epilogue>
inline void token_tiles(const PanelRun& run, int64_t panel0, int64_t num_panels,
                        Epilogue& epilogue) {
  int64_t m0 = 0;
  for (; m0 + MT <= run.num_tokens; m0 += MT) tile<NP, MT>(run, panel0, num_panels, m0, epilogue);
  const int64_t rest = run.num_tokens - m0;
  if (rest == 0) return;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((rest == R + 1 ? tile<NP, R + 1>(run, panel0, num_panels, m0, epilogue) : void()), ...);
  }(std::make_integer_sequence<int, MT - 1>{});
}

// 16 fp32 lanes -> bf16, rounded to nearest even as torch's float -> bfloat16 conversion.
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

inline __m512 from_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// The value torch would hold after rounding an fp32 result to a bf16 tensor.
inline __m512 round_bf16(__m512 v) { return from_bf16(to_bf16(v)); }

// Lanes [0, valid) of a 16-row panel.
inline __mmask16 row_mask(int64_t valid) {
  return static_cast<__mmask16>((1u << std::min<int64_t>(valid, kPanelRows)) - 1);
}

// Output row m of `count` panels from panel0: the fp32 sums plus the bf16 bias (if any),
// stored as bf16 -- the epilogue every linear kernel with a bf16 output ends in.
inline void store_bf16_row(bf16_t* output, int64_t output_stride, int64_t out_features,
                           const bf16_t* bias, int64_t panel0, int64_t count, int64_t m,
                           const __m512* sums) {
  for (int64_t p = 0; p < count; ++p) {
    const int64_t n0 = (panel0 + p) * kPanelRows;
    const __mmask16 mask = row_mask(out_features - n0);
    __m512 value = sums[p];
    if (bias != nullptr)
      value = _mm512_add_ps(value, from_bf16(_mm256_maskz_loadu_epi16(mask, bias + n0)));
    _mm256_mask_storeu_epi16(output + m * output_stride + n0, mask, to_bf16(value));
  }
}

}  // namespace protoserve::panel_gemm

#endif  // PROTOSERVE_AVX512_BF16
