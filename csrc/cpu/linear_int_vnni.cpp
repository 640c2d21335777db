// linear_int with int8 activations: out = sum over blocks b of 32 columns of
//
//   d_b(x) * sum_{k in b} a_k * Q[n, k]   (per weight group, times the group's scale)
//
// where a = round(x / d_b), d_b = max_{k in b} |x_k| / 127: the arithmetic llama.cpp uses for
// Q8_0 / Q4_0 weights (its Q8_0 activation blocks). The bf16-activation kernel (linear_int.cpp)
// turns every weight into a bf16 operand and spends two bf16 dot products per 32 weights (int8
// as two nibbles), so batch-1 decode was bound by the conversion, not by the bytes; here one
// vpdpbusd multiplies 64 weights by 64 int8 activations, after a single byte permute (int8) or
// three logic ops (int4), which leaves decode bound by memory again.
//
// The weights keep linear_int's panels (layout in linear_int.cpp), so the bf16 kernel, the
// dequantize-for-prefill path and resident bytes are unchanged:
//   int8: two 32-byte steps (columns 4q..4q+1 and 4q+2..4q+3 of 16 rows) permuted so that
//         lane r holds row r's 4 consecutive columns;
//   int4: one 32-byte step holds 4 columns of 16 rows; widening each byte to 16 bits and
//         moving the high nibble to the upper byte gives lane r the columns (0, 2, 1, 3), so the
//         activations are stored in that order instead.
// vpdpbusd multiplies unsigned by signed bytes: the stored values are Q + bias (128 / 8, 0 for
// K-quants with mins), and bias * sum(a) is subtracted per block in int32 (exact). Each block's
// int32 sum becomes float once, scaled by d_b; each group's sum by the rows' scale; offsets
// (zero points, K-quant mins) add offset * sum(x) with the exact float sums of x. So the only
// difference from the exact W8A16 result is x's quantization error, at most d_b / 2 per column.
//
// PROTOSERVE_INT_ACTIVATIONS (int8 | bf16) or set_int_activations choose per process; int8
// applies where compiled with AVX512-VNNI and VBMI, for 8- and 4-bit weights whose in_features
// and group size are multiples of 32 (every format in practice); Q6_K and other shapes run the
// bf16-activation kernel.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "cpu_types.h"
#include "linear_int.h"
#include "linear_int_groups.h"
#include "panel_gemm_avx512.h"
#include "vec_avx512.h"
#include "work_pool.h"

#if PROTOSERVE_AVX512_BF16 && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define PROTOSERVE_INT_VNNI 1
#else
#define PROTOSERVE_INT_VNNI 0
#endif

namespace protoserve {
namespace {

constexpr int64_t kBlock = 32;  // activation columns per int8 scale (llama.cpp's block)

enum class IntActivations { kInt8, kBf16 };

IntActivations parse_activations(const std::string& name, const char* setting) {
  if (name == "int8") return IntActivations::kInt8;
  if (name == "bf16") return IntActivations::kBf16;
  throw std::invalid_argument(std::string(setting) + " must be int8 or bf16, got '" + name +
                              "'");
}

// The process-wide choice; starts from PROTOSERVE_INT_ACTIVATIONS, read once.
std::atomic<IntActivations>& selected_activations() {
  static std::atomic<IntActivations> choice{[] {
    const char* env = std::getenv("PROTOSERVE_INT_ACTIVATIONS");
    return env == nullptr || *env == '\0'
               ? IntActivations::kInt8
               : parse_activations(env, "PROTOSERVE_INT_ACTIVATIONS");
  }()};
  return choice;
}

#if PROTOSERVE_INT_VNNI
using int_groups::kPanelRows;

// x quantized per token and block of 32 columns, in the weight layout's column order.
struct Int8Rows {
  std::vector<int32_t> quads;      // [M, K / 4]: 4 int8 each
  std::vector<float> scales;       // [M, K / 32]: d_b
  std::vector<int32_t> bias_sums;  // [M, K / 32]: bias * sum of the block's a
  std::vector<float> x_sums;       // [M, groups]: sum of x per group (offsets only)
};

Int8Rows quantize_rows(const LinearIntArgs& args, bool int4_order, bool group_sums) {
  const int64_t K = args.in_features, M = args.num_tokens, blocks = K / kBlock;
  const int64_t groups = ceil_div(K, args.group_size);
  const int bias = int_groups::value_bias(args);
  Int8Rows rows{std::vector<int32_t>(M * K / 4), std::vector<float>(M * blocks),
                std::vector<int32_t>(M * blocks), std::vector<float>(group_sums ? M * groups : 0)};
  const bf16_t* input = static_cast<const bf16_t*>(args.input);
  // int4 lanes hold columns (0, 2, 1, 3) of each quad: swap the middle two bytes.
  const __m128i quad_order = int4_order
      ? _mm_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15)
      : _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t m = 0; m < M; ++m) {
    const bf16_t* x = input + m * args.input_stride;
    int8_t* out = reinterpret_cast<int8_t*>(rows.quads.data() + m * K / 4);
    for (int64_t b = 0; b < blocks; ++b) {
      const bf16_t* block = x + b * kBlock;
      const auto load16 = [](const bf16_t* p) {
        return vec::bf16x16_to_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      };
      const __m512 lo = load16(block), hi = load16(block + 16);
      const float absmax = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_and_ps(lo, sign_mask), _mm512_and_ps(hi, sign_mask)));
      const float d = absmax / 127.0f;
      const __m512 inverse = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
      // Round to nearest even, as std::nearbyint in the default rounding mode.
      const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
      const __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * kBlock),
                       _mm_shuffle_epi8(_mm512_cvtepi32_epi8(q_lo), quad_order));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * kBlock + 16),
                       _mm_shuffle_epi8(_mm512_cvtepi32_epi8(q_hi), quad_order));
      rows.scales[m * blocks + b] = d;
      rows.bias_sums[m * blocks + b] =
          bias * _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
      if (group_sums) {
        // In column order, as the exact kernel's reference sums x.
        float sum = 0.0f;
        for (int64_t k = 0; k < kBlock; ++k) sum += bf16_to_float(block[k]);
        rows.x_sums[m * groups + b * kBlock / args.group_size] += sum;
      }
    }
  }
  return rows;
}

// Byte i of the permuted 64 bytes of two int8 steps: lane r = i / 4, column j = i % 4.
inline __m512i int8_order() {
  alignas(64) uint8_t index[64];
  for (int i = 0; i < 64; ++i) {
    const int r = i / 4, j = i % 4;
    index[i] = static_cast<uint8_t>(j < 2 ? 2 * r + j : 32 + 2 * r + j - 2);
  }
  return _mm512_load_si512(index);
}

// NP panels x MT tokens from token m0, block by block within each group.
template <int BITS, bool OFFSETS, int NP, int MT, typename Store>
inline void tile(const LinearIntArgs& args, const Int8Rows& rows, int64_t panel0,
                 int64_t num_panels, int64_t m0, Store& store) {
  constexpr int64_t quad_bytes = BITS == 8 ? 64 : 32;  // 4 columns of 16 rows
  const int64_t K = args.in_features, quads = K / 4, blocks = K / kBlock;
  const int64_t num_groups = ceil_div(K, args.group_size);
  const int64_t blocks_per_group = args.group_size / kBlock;
  const __m512i order = int8_order();
  __m512 total[NP][MT];
  int64_t panel_index[NP];
  const uint8_t* panels[NP];
  for (int p = 0; p < NP; ++p) {
    panel_index[p] = panel0 + std::min<int64_t>(p, num_panels - 1);  // in bounds, unused
    panels[p] = args.packed_weight + panel_index[p] * quads * quad_bytes;
    for (int t = 0; t < MT; ++t) total[p][t] = _mm512_setzero_ps();
  }
  const int32_t* a_rows[MT];
  for (int t = 0; t < MT; ++t) a_rows[t] = rows.quads.data() + (m0 + t) * quads;
  const bool prefetch = m0 == 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    __m512 group_sum[NP][MT];
    for (int p = 0; p < NP; ++p)
      for (int t = 0; t < MT; ++t) group_sum[p][t] = _mm512_setzero_ps();
    const int64_t block_end = std::min(blocks, (g + 1) * blocks_per_group);
    for (int64_t b = g * blocks_per_group; b < block_end; ++b) {
      __m512i acc[NP][MT];
      for (int p = 0; p < NP; ++p)
        for (int t = 0; t < MT; ++t) acc[p][t] = _mm512_setzero_si512();
      for (int64_t s = b * kBlock / 4; s < (b + 1) * kBlock / 4; ++s) {
        for (int p = 0; p < NP; ++p) {
          const uint8_t* vec = panels[p] + s * quad_bytes;
          if (prefetch && (BITS == 8 || (s & 1) == 0))
            __builtin_prefetch(vec + 4096, 0, panel_gemm::kPrefetchLocality);
          __m512i weights;
          if constexpr (BITS == 8) {
            weights = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(vec));
          } else {
            const __m512i words =
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vec)));
            // 0xA8: (a | b) & c, the low nibble in the low byte, the high one in the high.
            weights = _mm512_ternarylogic_epi32(words, _mm512_slli_epi16(words, 4),
                                                _mm512_set1_epi16(0x0F0F), 0xA8);
          }
          for (int t = 0; t < MT; ++t)
            acc[p][t] = _mm512_dpbusd_epi32(acc[p][t], weights, _mm512_set1_epi32(a_rows[t][s]));
        }
      }
      for (int t = 0; t < MT; ++t) {
        const __m512i bias_sum = _mm512_set1_epi32(rows.bias_sums[(m0 + t) * blocks + b]);
        const __m512 d = _mm512_set1_ps(rows.scales[(m0 + t) * blocks + b]);
        for (int p = 0; p < NP; ++p)
          group_sum[p][t] = _mm512_fmadd_ps(
              _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[p][t], bias_sum)), d, group_sum[p][t]);
      }
    }
    for (int p = 0; p < NP; ++p) {
      const __m512 scale = int_groups::group_scale(args, panel_index[p], g, num_groups);
      for (int t = 0; t < MT; ++t)
        total[p][t] = _mm512_fmadd_ps(group_sum[p][t], scale, total[p][t]);
      if constexpr (OFFSETS) {
        const __m512 offset = int_groups::group_offset(args, panel_index[p], g, num_groups);
        for (int t = 0; t < MT; ++t)
          total[p][t] = _mm512_fmadd_ps(
              _mm512_set1_ps(rows.x_sums[(m0 + t) * num_groups + g]), offset, total[p][t]);
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    __m512 sums[NP];
    for (int p = 0; p < NP; ++p) sums[p] = total[p][t];
    store(m0 + t, sums);
  }
}

template <int BITS, bool OFFSETS, int NP, int MT>
void run(const LinearIntArgs& args, const Int8Rows& rows) {
  const int64_t num_panels = ceil_div(args.out_features, kPanelRows);
  const bf16_t* bias = static_cast<const bf16_t*>(args.bias);
  bf16_t* output = static_cast<bf16_t*>(args.output);
  work_pool::parallel_for(0, ceil_div(num_panels, NP), 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t panel0 = g * NP;
      const int64_t count = std::min<int64_t>(NP, num_panels - panel0);
      auto store = [&](int64_t m, const __m512* sums) {
        panel_gemm::store_bf16_row(output, args.output_stride, args.out_features, bias,
                                   panel0, count, m, sums);
      };
      int64_t m0 = 0;
      for (; m0 + MT <= args.num_tokens; m0 += MT)
        tile<BITS, OFFSETS, NP, MT>(args, rows, panel0, count, m0, store);
      for (; m0 < args.num_tokens; ++m0)
        tile<BITS, OFFSETS, NP, 1>(args, rows, panel0, count, m0, store);
    }
  });
}

template <int BITS, bool OFFSETS>
void dispatch(const LinearIntArgs& args) {
  const Int8Rows rows = quantize_rows(args, BITS == 4, OFFSETS);
  if (args.num_tokens == 1) {
    run<BITS, OFFSETS, 4, 1>(args, rows);
  } else {
    run<BITS, OFFSETS, 2, 4>(args, rows);
  }
}
#endif

}  // namespace

bool int8_activations_compiled() { return PROTOSERVE_INT_VNNI != 0; }

bool int8_activations_apply(int bits, int64_t in_features, int64_t group_size) {
  return int8_activations_compiled() && (bits == 8 || bits == 4) && in_features % kBlock == 0 &&
         group_size % kBlock == 0 &&
         selected_activations().load(std::memory_order_relaxed) == IntActivations::kInt8;
}

std::string set_int_activations(const std::string& name) {
  const IntActivations choice = parse_activations(name, "int activations");
  return selected_activations().exchange(choice) == IntActivations::kInt8 ? "int8" : "bf16";
}

bool linear_int_int8_activations(const LinearIntArgs& args) {
  if (!int8_activations_apply(args.bits, args.in_features, args.group_size)) return false;
#if PROTOSERVE_INT_VNNI
  const bool offsets = int_groups::has_offsets(args);
  if (args.bits == 8) {
    offsets ? dispatch<8, true>(args) : dispatch<8, false>(args);
  } else {
    offsets ? dispatch<4, true>(args) : dispatch<4, false>(args);
  }
  return true;
#else
  return false;
#endif
}

}  // namespace protoserve
