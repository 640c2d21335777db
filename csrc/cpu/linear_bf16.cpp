// linear_bf16: out[M, N] = x[M, K] . W[N, K]^T (+ bias) in bfloat16 with fp32 accumulation.
//
// Decode reads every weight once per step, so its speed is the speed at which W streams from
// memory. W is packed once at load time into "pair-column panels":
//
//   packed[p, k2, r, j] = W[16 p + r, 2 k2 + j]      shape [ceil(N / 16), K / 2, 16, 2]
//
// One 64-byte vector of panel p at pair k2 holds rows 16p..16p+15, columns 2k2 and 2k2+1, so
// `_mm512_dpbf16_ps(acc, panel_vec, broadcast(x[m, 2k2], x[m, 2k2 + 1]))` adds the pair's
// contribution to 16 outputs of token m at once: no horizontal sums, and a panel is one
// contiguous run the hardware prefetchers stream at full bandwidth.
//
// A tile is kPanels panels x MT tokens of fp32 accumulators held in registers; the token
// loop sits inside the panel loop so each tile's weights (kPanels * 16 * K bf16, L2-sized)
// are read from memory once and re-read from cache by the following token tiles. Threads
// split the panels into contiguous ranges; a thread's result does not depend on the thread
// count (each output is one accumulator summed in k order), so outputs are reproducible.
#include <algorithm>
#include <utility>

#include "cpu_ops.h"

namespace protoserve {

#if PROTOSERVE_AVX512_BF16
namespace {

constexpr int kPanelRows = 16;
// Pairs ahead of the current one whose panel bytes are prefetched (4 KiB per panel), into L2
// (prefetcht1). A non-temporal prefetch (prefetchnta) streams ~30% slower on Zen 4: it fills
// L1 only, so the prefetches in flight are bounded by L1's few miss buffers, not L2's many.
constexpr int64_t kPrefetchPairs = 64;
constexpr int kPrefetchLocality = 2;  // __builtin_prefetch's 2 = prefetcht1

// Accumulates MT tokens against `num_panels` (<= NP) consecutive panels. NP * MT accumulators
// plus NP weight vectors stay in the 32 zmm registers; x pairs are broadcast from L1 inside
// the multiply (a folded memory operand), not held in registers.
template <int NP, int MT>
void tile(const LinearArgs& a, int64_t panel0, int64_t num_panels, int64_t m0) {
  const int64_t pairs = a.in_features / 2;
  const bf16_t* w = static_cast<const bf16_t*>(a.packed_weight);
  const int64_t panel_stride = pairs * 2 * kPanelRows;  // bf16 elements per panel
  __m512 acc[NP][MT];
  for (int p = 0; p < NP; ++p)
    for (int t = 0; t < MT; ++t) acc[p][t] = _mm512_setzero_ps();

  // Missing panels (the last group of a matrix) alias the last real one: the loads stay in
  // bounds and their accumulators are never stored.
  const bf16_t* panels[NP];
  for (int p = 0; p < NP; ++p)
    panels[p] = w + (panel0 + std::min<int64_t>(p, num_panels - 1)) * panel_stride;
  const int32_t* x_rows[MT];
  for (int t = 0; t < MT; ++t)
    x_rows[t] = reinterpret_cast<const int32_t*>(static_cast<const bf16_t*>(a.input) +
                                                 (m0 + t) * a.input_stride);
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

  for (int64_t p = 0; p < num_panels; ++p) {
    const int64_t n0 = (panel0 + p) * kPanelRows;
    const int64_t valid = std::min<int64_t>(kPanelRows, a.out_features - n0);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
    __m512 bias = _mm512_setzero_ps();
    if (a.bias != nullptr) {
      const __m256i bits =
          _mm256_maskz_loadu_epi16(mask, static_cast<const bf16_t*>(a.bias) + n0);
      bias = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    for (int t = 0; t < MT; ++t) {
      // vcvtneps2bf16 rounds to nearest even, as torch's float -> bfloat16 conversion does.
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[p][t], bias));
      _mm256_mask_storeu_epi16(static_cast<bf16_t*>(a.output) + (m0 + t) * a.output_stride + n0,
                               mask, out);
    }
  }
}

// All tokens against one group of NP panels: full tiles of kTileTokens<NP>, then one smaller.
template <int NP, int MT>
void token_tiles(const LinearArgs& a, int64_t panel0, int64_t num_panels) {
  int64_t m0 = 0;
  for (; m0 + MT <= a.num_tokens; m0 += MT) tile<NP, MT>(a, panel0, num_panels, m0);
  const int64_t rest = a.num_tokens - m0;
  if (rest == 0) return;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((rest == R + 1 ? tile<NP, R + 1>(a, panel0, num_panels, m0) : void()), ...);
  }(std::make_integer_sequence<int, MT - 1>{});
}

template <int NP, int MT>
void run(const LinearArgs& args) {
  const int64_t num_panels = ceil_div(args.out_features, kPanelRows);
  const int64_t num_groups = ceil_div(num_panels, NP);
  // Contiguous ranges of panel groups per thread: each thread streams one run of memory.
  at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t panel0 = g * NP;
      token_tiles<NP, MT>(args, panel0, std::min<int64_t>(NP, num_panels - panel0));
    }
  });
}

}  // namespace

void linear_bf16(const LinearArgs& args) {
  // Few tokens: memory bound, so more panels in flight; many: compute bound, so the tile
  // with the most multiplies per weight load that still fits the register file.
  if (args.num_tokens == 1) {
    run<8, 1>(args);
  } else if (args.num_tokens <= 4) {
    run<4, 4>(args);
  } else {
    run<3, 8>(args);
  }
}

#else

void linear_bf16(const LinearArgs&) {}  // never called: has_avx512_bf16() is false

#endif

}  // namespace protoserve
