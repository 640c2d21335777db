// An AMX (tdpbf16ps) micro-kernel over the same pair-column panels as panel_gemm_avx512.h:
//
//   packed[p, k2, r, j] = W[16 p + r, 2 k2 + j]      shape [ceil(N / 16), K / 2, 16, 2]
//
// That layout already is AMX's "VNNI pair" B layout: 16 consecutive pairs of panel p (k2 ..
// k2 + 15, 64 bytes each) are one B tile of 32 k x 16 outputs, contiguous with a 64-byte row
// stride, so the weights are read in place and there is still one copy of them. A tiles are
// 16 token rows x 32 k straight from the activations (row stride = the input's); C tiles are
// 16 x 16 fp32 accumulators that are stored once at the end and handed to the caller's
// epilogue as panel sums, exactly like panel_gemm::tile's, so the epilogues are shared.
//
// One tile step is up to 2 A tiles x 2 B tiles into 4 C tiles (all 8 tile registers), i.e.
// 32 tokens x 2 panels. Rows past the last token and k past K must read zeros, not memory
// past the end: callers pass activations padded to whole 16-row, 32-k tiles (AmxInput) and
// the kernel copies the last, partial k block of each panel into a zero-padded buffer.
//
// AMX needs the CPU's AMX-TILE and AMX-BF16 and the kernel's permission to use the large tile
// state (arch_prctl ARCH_REQ_XCOMP_PERM); `amx_usable()` checks both once per process. The
// tile configuration is loaded at the start of every parallel chunk and released at its end,
// not cached per thread: oneDNN (torch's F.linear) runs AMX kernels on the same threads and
// releases the tiles after each call, which would leave a cached "configured" flag stale.
#pragma once

#include "cpu_types.h"

#include <vector>

#if PROTOSERVE_AVX512_BF16 && defined(__x86_64__) && defined(__linux__) && \
    (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11))
#define PROTOSERVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define PROTOSERVE_AMX 0
#endif

#if PROTOSERVE_AMX

#define PROTOSERVE_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

namespace protoserve {
// Whether a GEMM of `rows` token rows runs on AMX tiles: set_linear_kernel's choice, for
// linear_bf16 and moe_bf16 alike (defined in linear_bf16.cpp).
bool amx_for_rows(int64_t rows);
}  // namespace protoserve

namespace protoserve::panel_gemm::amx {

constexpr int kTileRows = 16;  // tokens per A tile, pairs per B tile
constexpr int kTileK = 32;     // k per A row (64 bytes of bf16)
constexpr int kBlockTokens = 2 * kTileRows;
// B tiles (1 KiB each, per panel) ahead of the current one that are prefetched: the same 4 KiB
// per panel as panel_gemm_avx512.h's kPrefetchPairs. Prefetches past a panel's end do not fault.
constexpr int64_t kPrefetchBlocks = 4;

inline bool detect() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
  if (!amx_bf16 || !amx_tile) return false;
  // Linux >= 5.16 hands out the 8 KiB tile state (XFEATURE_XTILEDATA = 18) only on request.
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXtileData) != 0) return false;
  unsigned long features = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &features) != 0) return false;
  return (features >> kXtileData) & 1;
}

// Once per process (a thread-safe static); false forever if the CPU or the OS says no.
inline bool amx_usable() {
  static const bool usable = detect();
  return usable;
}

// Activations as the A tiles read them: rows padded to a multiple of 16 and k to a multiple of
// 32 with zeros, or the caller's own rows when they already are whole tiles.
struct AmxInput {
  const bf16_t* rows;
  int64_t stride;  // elements between rows
};

// The A rows of `num_tokens` x `in_features` activations: in place when they already are
// whole tiles, else copied (M x K, small next to the M x K x N multiply) into `padded`,
// zero-filled, because partial tiles would read past the last row or k.
inline AmxInput tile_input(const bf16_t* input, int64_t input_stride, int64_t num_tokens,
                           int64_t in_features, std::vector<bf16_t>& padded) {
  const int64_t padded_k = ceil_div(in_features, kTileK) * kTileK;
  const int64_t padded_rows = ceil_div(num_tokens, kTileRows) * kTileRows;
  if (padded_k == in_features && padded_rows == num_tokens) return {input, input_stride};
  padded.assign(padded_rows * padded_k, 0);
  for (int64_t m = 0; m < num_tokens; ++m)
    std::memcpy(padded.data() + m * padded_k, input + m * input_stride,
                in_features * sizeof(bf16_t));
  return {padded.data(), padded_k};
}

// Palette 1, every tile 16 rows x 64 bytes: tmm0-3 C, tmm4-5 A, tmm6-7 B.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

PROTOSERVE_AMX_TARGET inline void load_tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTileRows;
  }
  _tile_loadconfig(&config);
}

PROTOSERVE_AMX_TARGET inline void release_tiles() { _tile_release(); }

// The B tiles of one panel: `full_blocks` whole 32-k blocks read in place, then (when K is not
// a multiple of 32) the partial last block from `tail`, a zero-padded 16 x 64-byte copy.
struct PanelTiles {
  const bf16_t* panel;
  const bf16_t* tail;  // nullptr when K % 32 == 0
};

inline void copy_tail(const bf16_t* panel, int64_t in_features, bf16_t* tail) {
  const int64_t pairs = in_features / 2;
  const int64_t first = pairs / kTileRows * kTileRows;
  constexpr int64_t kPairElements = 2 * kTileRows;  // one pair of a 16-row panel
  std::memset(tail, 0, kTileRows * kPairElements * sizeof(bf16_t));
  std::memcpy(tail, panel + first * kPairElements,
              (pairs - first) * kPairElements * sizeof(bf16_t));
  // GCC's tileloadd is an asm statement without a memory operand: this barrier keeps the
  // copy from being treated as a dead store.
  __asm__ volatile("" ::: "memory");
}

// One 32-k block: C[mb][nb] += A[mb] . B[nb]. The tile registers are architectural state, so
// the accumulators live on across calls.
template <int MB, int NB>
PROTOSERVE_AMX_TARGET inline __attribute__((always_inline)) void step(
    const bf16_t* a0, const bf16_t* a1, int64_t a_stride, const bf16_t* b0, const bf16_t* b1) {
  _tile_loadd(6, b0, 64);
  _tile_loadd(4, a0, a_stride);
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (NB == 2) {
    _tile_loadd(7, b1, 64);
    _tile_dpbf16ps(1, 4, 7);
  }
  if constexpr (MB == 2) {
    _tile_loadd(5, a1, a_stride);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
  }
}

// MB A tiles (16 tokens each) from token m0 against NB panels; calls epilogue(m, sums[NB])
// for the first `valid_rows` tokens of the block.
template <int MB, int NB, typename Epilogue>
PROTOSERVE_AMX_TARGET inline void tile(const AmxInput& input, int64_t in_features,
                                       const PanelTiles* panels, int64_t m0, int64_t valid_rows,
                                       Epilogue& epilogue) {
  static_assert(MB >= 1 && MB <= 2 && NB >= 1 && NB <= 2);
  constexpr int64_t kBTileElements = kTileRows * kTileK;
  const int64_t a_stride = input.stride * static_cast<int64_t>(sizeof(bf16_t));
  const bf16_t* a0 = input.rows + m0 * input.stride;
  const bf16_t* a1 = a0 + kTileRows * input.stride;
  const int64_t full_blocks = in_features / kTileK;
  const bool has_tail = in_features % kTileK != 0;
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (MB == 2) _tile_zero(2);
  if constexpr (MB == 2 && NB == 2) _tile_zero(3);

  const bf16_t* b0 = panels[0].panel;
  const bf16_t* b1 = panels[NB - 1].panel;
  // Only the first token block reads the panels from memory; later ones find them in L2. Its
  // B tiles are prefetched a few blocks ahead (into L2, as panel_gemm_avx512.h's) so that
  // tileloadd does not wait on memory latency.
  const bool prefetch = m0 == 0;
  for (int64_t kb = 0; kb < full_blocks; ++kb) {
    if (prefetch) {
      constexpr int64_t kLineElements = 32;  // 64-byte lines
      const bf16_t* ahead0 = b0 + (kb + kPrefetchBlocks) * kBTileElements;
      const bf16_t* ahead1 = b1 + (kb + kPrefetchBlocks) * kBTileElements;
      for (int64_t line = 0; line < kBTileElements; line += kLineElements) {
        __builtin_prefetch(ahead0 + line, 0, 2);
        if constexpr (NB == 2) __builtin_prefetch(ahead1 + line, 0, 2);
      }
    }
    step<MB, NB>(a0 + kb * kTileK, a1 + kb * kTileK, a_stride, b0 + kb * kBTileElements,
                 b1 + kb * kBTileElements);
  }
  if (has_tail)
    step<MB, NB>(a0 + full_blocks * kTileK, a1 + full_blocks * kTileK, a_stride,
                 panels[0].tail, panels[NB - 1].tail);

  // C tile (mb, nb) holds tokens m0 + 16 mb .. and the 16 outputs of panel nb.
  alignas(64) float sums[2][2][kTileRows][kTileRows];
  _tile_stored(0, sums[0][0], 64);
  if constexpr (NB == 2) _tile_stored(1, sums[0][1], 64);
  if constexpr (MB == 2) _tile_stored(2, sums[1][0], 64);
  if constexpr (MB == 2 && NB == 2) _tile_stored(3, sums[1][1], 64);
  for (int64_t t = 0; t < std::min<int64_t>(valid_rows, MB * kTileRows); ++t) {
    __m512 row[NB];
    for (int nb = 0; nb < NB; ++nb)
      row[nb] = _mm512_load_ps(sums[t / kTileRows][nb][t % kTileRows]);
    epilogue(m0 + t, row);
  }
}

// All `num_tokens` tokens against NB panels, in 32-token blocks (the last may be 16).
template <int NB, typename Epilogue>
PROTOSERVE_AMX_TARGET inline void token_blocks(const AmxInput& input, int64_t in_features,
                                               int64_t num_tokens, const PanelTiles* panels,
                                               Epilogue& epilogue) {
  for (int64_t m0 = 0; m0 < num_tokens; m0 += kBlockTokens) {
    const int64_t rows = num_tokens - m0;
    if (rows > kTileRows)
      tile<2, NB>(input, in_features, panels, m0, rows, epilogue);
    else
      tile<1, NB>(input, in_features, panels, m0, rows, epilogue);
  }
}

}  // namespace protoserve::panel_gemm::amx

#endif  // PROTOSERVE_AMX
