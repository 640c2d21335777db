// linear_int: out[M, N] = x[M, K] . dequant(Q)[N, K]^T (+ bias), x and out bfloat16, Q int8 or
// int4 with fp32 (or exactly representable fp16) scales per (row, group of group_size columns).
//
// Decode streams every weight once per step, so fewer bytes per weight is the speed-up, as
// long as turning bytes into bf16 operands costs less than streaming them did. Integers
// become bf16 with one zero-extension and a logic op or two: an unsigned nibble u placed in
// the mantissa of 128.0 (bits 0x4300 | u) IS the bf16 value 128 + u, exactly. The multiply stays
// the AVX512_BF16 pair dot product of linear_bf16 (panel_gemm_avx512.h), over the same
// 16-row panels, so within a group
//
//   sum_k x_k (128 + u_k) = sum_k x_k q_k + C sum_k x_k
//
// and the per-group epilogue subtracts C * sum(x) (a per-token sum computed once per call)
// and multiplies by the rows' scales. Layouts (element e = 2 r + j of a pair is row r of the
// panel, column j of the pair, as in linear_bf16's panels):
//
//   int8: packed[p, k2, e]       = Q[16 p + r, 2 k2 + j] + 128   (one byte, two nibbles: the
//         high nibble's dot product takes 16 x, exact in bf16)   C = 128 + 16 * 128 + 128
//   int4: packed[p, k4, e] low   = Q[16 p + r, 4 k4 + j] + 8     (pair 2 k4)
//                          high  = Q[16 p + r, 4 k4 + 2 + j] + 8 (pair 2 k4 + 1)   C = 136
//   scales[p, g, r]              = scale[16 p + r, g]
//
// Products are exact and sums fp32, so the result is the exact x . (Q * scale) up to fp32
// summation error, rounded once to bf16.
//
// Asymmetric weights (GPTQ / AWQ zero points, compressed-tensors asymmetric) are
// w = Q * scale + offset per (row, group) with offset = -zero * scale; the offset's share of a
// group is offset * sum(x), the same per-token group sum, so the epilogue adds one more fma:
//   offsets[p, g, r]             = offset[16 p + r, g]
//
// GGUF's K-quants (Q4_K, Q6_K) use the same tiles with two-level scales (SuperBlockScales):
// the per-group scale d * sc and offset -(dmin * m) are formed in registers at each group's
// epilogue from one byte per (row, group) and an fp16 per (row, super-block); Q4_K's values
// are unsigned (its q, 0..15), so C loses the int4 bias: C = 128. Q6_K's 6-bit values (q + 32,
// 0..63) keep their own layout, 48 bytes per 4 columns of a panel: the int4 layout of their
// low 4 bits, then 16 bytes of the high 2 bits, byte b holding lanes b and b + 16 of both
// column pairs (bits 0-1 pair 2 k4 lane b, 2-3 pair 2 k4 + 1 lane b, 4-5 and 6-7 lane
// b + 16), whose dot products take 16 x as int8's high nibbles do: C = 2176 + 32.
#include <algorithm>
#include <utility>
#include <vector>

#include "cpu_types.h"
#include "linear_int.h"
#include "linear_int_groups.h"
#include "panel_gemm_avx512.h"

namespace protoserve {

#if PROTOSERVE_AVX512_BF16
namespace {

using panel_gemm::kPanelRows;
using int_groups::group_offset;
using int_groups::group_scale;
using int_groups::value_bias;

constexpr int64_t kVectorBytes = 32;  // one load per step: 32 (int8) or 64 (int4) weights

// Bytes of one step of a panel: int8 / int4 one 32-byte vector; 6-bit also the high bits.
template <int BITS>
constexpr int64_t step_bytes() {
  return BITS == 6 ? 48 : kVectorBytes;
}
constexpr int64_t kPrefetchBytes = 4096;

// The two bf16 operands (128 + h, pairs 2 k4 and 2 k4 + 1) of 6-bit values' high 2 bits,
// 32 lanes each, from their 16 bytes (layout in the header comment).
inline void high_bit_operands(const uint8_t* bytes, __m512bh& first, __m512bh& second) {
  const __m512i words = _mm512_cvtepu8_epi16(
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
  // Lanes 16-31 read the upper nibble of the same bytes.
  const __m512i shifts = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004,
                                          0x0004000400040004, 0x0004000400040004, 0, 0, 0, 0);
  const __m512i lanes = _mm512_srlv_epi16(words, shifts);
  const __m512i exponent = _mm512_set1_epi16(0x4300);
  first = (__m512bh)_mm512_ternarylogic_epi32(lanes, _mm512_set1_epi16(0x0003), exponent, 0xEA);
  second = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(lanes, 2),
                                               _mm512_set1_epi16(0x0003), exponent, 0xEA);
}

struct IntRun {
  const LinearIntArgs* args;
  float correction;  // the constant C of the header comment
  const uint8_t* weight;
  GroupValues scales;
  GroupValues offsets;  // data nullptr: symmetric
  int64_t in_features;
  int64_t group_size;
  int64_t num_groups;
  const bf16_t* input;  // x rows
  int64_t input_stride;
  const bf16_t* input16;  // int8 only: 16 x, contiguous rows of in_features
  const float* x_sums;    // [num_tokens, num_groups]
  int64_t num_tokens;
};

// Two bf16 operands of 32 lanes from 32 bytes: the low nibbles' 128 + u, then the high's.
// Zero-extended to 16-bit lanes first, so the high nibble needs no mask after its shift and
// the low one takes a single ternary-logic op ((w & 0xF) | 0x4300).
inline void nibble_operands(const uint8_t* bytes, __m512bh& low, __m512bh& high) {
  const __m512i words =
      _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  const __m512i exponent = _mm512_set1_epi16(0x4300);
  // 0xEA: a & b | c.
  low = (__m512bh)_mm512_ternarylogic_epi32(words, _mm512_set1_epi16(0x000F), exponent, 0xEA);
  high = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 4), exponent);
}

// NP panels x MT tokens from token m0, group by group; see panel_gemm::tile.
template <int BITS, bool OFFSETS, int NP, int MT, typename Epilogue>
inline void tile(const IntRun& run, int64_t panel0, int64_t num_panels, int64_t m0,
                 Epilogue& epilogue) {
  // Steps of one 32-byte load: int8 one pair of columns, int4 two.
  constexpr int64_t pairs_per_step = BITS == 8 ? 1 : 2;
  const float correction = run.correction;
  const int64_t pairs = run.in_features / 2;
  const int64_t steps = pairs / pairs_per_step;
  const int64_t panel_stride = steps * step_bytes<BITS>();
  __m512 total[NP][MT];
  __m512 acc[NP][MT];
  for (int p = 0; p < NP; ++p)
    for (int t = 0; t < MT; ++t) total[p][t] = acc[p][t] = _mm512_setzero_ps();
  int64_t panel_index[NP];
  const uint8_t* panels[NP];
  for (int p = 0; p < NP; ++p) {
    panel_index[p] = panel0 + std::min<int64_t>(p, num_panels - 1);  // in bounds, unused
    panels[p] = run.weight + panel_index[p] * panel_stride;
  }
  const int32_t* x_rows[MT];
  const int32_t* x16_rows[MT];
  for (int t = 0; t < MT; ++t) {
    x_rows[t] = reinterpret_cast<const int32_t*>(run.input + (m0 + t) * run.input_stride);
    x16_rows[t] = BITS != 4 ? reinterpret_cast<const int32_t*>(
                                  run.input16 + (m0 + t) * run.in_features)
                            : nullptr;
  }
  const bool prefetch = m0 == 0;
  const int64_t group_steps = run.group_size / 2 / pairs_per_step;

  for (int64_t g = 0; g < run.num_groups; ++g) {
    const int64_t end = std::min(steps, (g + 1) * group_steps);
    for (int64_t s = g * group_steps; s < end; ++s) {
      for (int p = 0; p < NP; ++p) {
        const uint8_t* vec = panels[p] + s * step_bytes<BITS>();
        if (prefetch && (s & 1) == 0)
          __builtin_prefetch(vec + kPrefetchBytes, 0, panel_gemm::kPrefetchLocality);
        __m512bh low, high, top_first, top_second;
        nibble_operands(vec, low, high);
        if constexpr (BITS == 6) high_bit_operands(vec + kVectorBytes, top_first, top_second);
        for (int t = 0; t < MT; ++t) {
          if constexpr (BITS == 8) {
            acc[p][t] = _mm512_dpbf16_ps(acc[p][t], low,
                                         (__m512bh)_mm512_set1_epi32(x_rows[t][s]));
            acc[p][t] = _mm512_dpbf16_ps(acc[p][t], high,
                                         (__m512bh)_mm512_set1_epi32(x16_rows[t][s]));
          } else {
            acc[p][t] = _mm512_dpbf16_ps(acc[p][t], low,
                                         (__m512bh)_mm512_set1_epi32(x_rows[t][2 * s]));
            acc[p][t] = _mm512_dpbf16_ps(acc[p][t], high,
                                         (__m512bh)_mm512_set1_epi32(x_rows[t][2 * s + 1]));
            if constexpr (BITS == 6) {
              acc[p][t] = _mm512_dpbf16_ps(acc[p][t], top_first,
                                           (__m512bh)_mm512_set1_epi32(x16_rows[t][2 * s]));
              acc[p][t] = _mm512_dpbf16_ps(acc[p][t], top_second,
                                           (__m512bh)_mm512_set1_epi32(x16_rows[t][2 * s + 1]));
            }
          }
        }
      }
    }
    // Group epilogue: remove the constant C's share, apply the rows' scales (and offsets).
    for (int p = 0; p < NP; ++p) {
      const __m512 scale = group_scale(*run.args, panel_index[p], g, run.num_groups);
      for (int t = 0; t < MT; ++t) {
        const __m512 offset =
            _mm512_set1_ps(correction * run.x_sums[(m0 + t) * run.num_groups + g]);
        total[p][t] = _mm512_fmadd_ps(_mm512_sub_ps(acc[p][t], offset), scale, total[p][t]);
        acc[p][t] = _mm512_setzero_ps();
      }
      if constexpr (OFFSETS) {
        const __m512 offset = group_offset(*run.args, panel_index[p], g, run.num_groups);
        for (int t = 0; t < MT; ++t)
          total[p][t] = _mm512_fmadd_ps(
              _mm512_set1_ps(run.x_sums[(m0 + t) * run.num_groups + g]), offset, total[p][t]);
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    __m512 sums[NP];
    for (int p = 0; p < NP; ++p) sums[p] = total[p][t];
    epilogue(m0 + t, sums);
  }
}

template <int BITS, bool OFFSETS, int NP, int MT, typename Epilogue>
inline void token_tiles(const IntRun& run, int64_t panel0, int64_t num_panels,
                        Epilogue& epilogue) {
  int64_t m0 = 0;
  for (; m0 + MT <= run.num_tokens; m0 += MT)
    tile<BITS, OFFSETS, NP, MT>(run, panel0, num_panels, m0, epilogue);
  const int64_t rest = run.num_tokens - m0;
  if (rest == 0) return;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((rest == R + 1 ? tile<BITS, OFFSETS, NP, R + 1>(run, panel0, num_panels, m0, epilogue)
                    : void()),
     ...);
  }(std::make_integer_sequence<int, MT - 1>{});
}

template <int BITS, bool OFFSETS, int NP, int MT>
void run(const LinearIntArgs& args) {
  const int64_t num_panels = ceil_div(args.out_features, kPanelRows);
  const int64_t num_panel_groups = ceil_div(num_panels, NP);
  const int64_t num_groups = ceil_div(args.in_features, args.group_size);
  const bf16_t* input = static_cast<const bf16_t*>(args.input);
  // Per token: sum(x) of each group (C's and the offsets' share) and, for int8, 16 x.
  std::vector<float> x_sums(args.num_tokens * num_groups, 0.0f);
  std::vector<bf16_t> input16(BITS != 4 ? args.num_tokens * args.in_features : 0);
  for (int64_t m = 0; m < args.num_tokens; ++m) {
    const bf16_t* row = input + m * args.input_stride;
    for (int64_t k = 0; k < args.in_features; ++k) {
      const float value = bf16_to_float(row[k]);
      x_sums[m * num_groups + k / args.group_size] += value;
      if constexpr (BITS != 4) input16[m * args.in_features + k] = float_to_bf16(value * 16.0f);
    }
  }
  // C of the header comment, less the bias K-quants' unsigned values do not have.
  const float correction =
      (BITS != 4 ? 2176.0f : 128.0f) + static_cast<float>(value_bias(args));
  const IntRun gemm{&args, correction, args.packed_weight, args.scales, args.offsets,
                    args.in_features,   args.group_size, num_groups,
                    input,              args.input_stride, input16.data(),
                    x_sums.data(),      args.num_tokens};
  const bf16_t* bias = static_cast<const bf16_t*>(args.bias);
  bf16_t* output = static_cast<bf16_t*>(args.output);
  protoserve::work_pool::parallel_for(0, num_panel_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t panel0 = g * NP;
      const int64_t group_panels = std::min<int64_t>(NP, num_panels - panel0);
      auto store = [&](int64_t m, const __m512* sums) {
        panel_gemm::store_bf16_row(output, args.output_stride, args.out_features, bias,
                                   panel0, group_panels, m, sums);
      };
      token_tiles<BITS, OFFSETS, NP, MT>(gemm, panel0, group_panels, store);
    }
  });
}

// Accumulators and running totals both stay in registers: half linear_bf16's tiles.
template <int BITS, bool OFFSETS>
void dispatch(const LinearIntArgs& args) {
  if (args.num_tokens == 1) {
    run<BITS, OFFSETS, 8, 1>(args);
  } else if (args.num_tokens <= 4) {
    run<BITS, OFFSETS, 3, 4>(args);
  } else {
    run<BITS, OFFSETS, 2, 6>(args);
  }
}

}  // namespace

void linear_int(const LinearIntArgs& args) {
  if (linear_int_prefill(args)) return;            // linear_int_prefill.cpp: AMX from 16 rows
  if (linear_int_int8_activations(args)) return;  // linear_int_vnni.cpp, where selected
  const bool offsets =
      args.offsets.data != nullptr || (args.super != nullptr && args.super->mins != nullptr);
  if (args.bits == 8) {
    offsets ? dispatch<8, true>(args) : dispatch<8, false>(args);
  } else if (args.bits == 6) {  // Q6_K only: no offsets (the bindings check)
    dispatch<6, false>(args);
  } else {
    offsets ? dispatch<4, true>(args) : dispatch<4, false>(args);
  }
}

#else

void linear_int(const LinearIntArgs&) {}  // never called: has_avx512_bf16() is false

#endif

}  // namespace protoserve
