// linear_w8a8: out[M, N] = dequant(quant(x))[M, K] . (Q * w_scale)[N, K]^T (+ bias), the
// arithmetic of compressed-tensors' W8A8 scheme (llm-compressor's "W8A8" / "INT8" preset):
//
//   per token m:  a_scale[m] = max_k |x[m, k]| / 127.5   (float32; 0 -> float32 eps)
//                 a[m, k]    = clamp(round_half_even(x[m, k] / a_scale[m]), -128, 127)
//   out[m, n]    = (sum_k a[m, k] Q[n, k]) * (w_scale[n] * a_scale[m]) + bias[n]
//
// The sum is exact in int32, so all three kernels below give the same bits. Weights are
// stored unsigned (u = Q + 128) because VNNI's vpdpbusd multiplies unsigned by signed bytes:
// sum_k a u = sum_k a Q + 128 sum_k a, and the per-token sum_k a is subtracted once.
//
// Layout: 16-row panels of 4-column quads, byte 4 r + j of step s = u[16 p + r, 4 s + j]:
//   - VNNI: one 64-byte load is one step for 16 rows; vpdpbusd against the token's 4 bytes
//     broadcast adds it into 16 int32 row sums (64 multiply-adds per instruction);
//   - AMX-INT8: 16 consecutive steps (1 KiB, contiguous) are one B tile of 64 k x 16 rows,
//     read in place; A tiles are 16 tokens x 64 k of the quantized activations.
// K is padded to a multiple of 64 at packing time (u = 128, and a = 0 past in_features), so
// no kernel needs a tail.
#include "linear_w8a8.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "cpu_types.h"
#include "panel_gemm_amx.h"

namespace protoserve {
namespace {

constexpr int64_t kRows = 16;       // output rows per panel
constexpr int64_t kStepBytes = 64;  // 16 rows x 4 columns
// Below this many tokens AMX's 16-row A tiles are mostly padding and VNNI is faster: one
// 4096 x 4096 layer on one thread took 0.87 / 1.31 ms (VNNI) against 1.38 / 1.51 ms (AMX) at
// 4 / 8 tokens, 10.4 against 2.95 ms at 64 (2026-12-07, shared Xeon with AMX, best of 15).
constexpr int64_t kW8A8AmxMinTokens = 16;
constexpr int64_t kAmxTokenBlock = 32;  // two A tiles

// Activations quantized per token: a [rows_padded, padded_in] int8 (zeros past the real
// tokens and columns), their sums and scales.
struct QuantizedRows {
  std::vector<int8_t> values;
  std::vector<int32_t> sums;
  std::vector<float> scales;
};

QuantizedRows quantize_rows(const LinearW8A8Args& args, int64_t padded_tokens) {
  const int64_t k_pad = args.padded_in_features;
  QuantizedRows rows{std::vector<int8_t>(padded_tokens * k_pad, 0),
                     std::vector<int32_t>(args.num_tokens, 0),
                     std::vector<float>(args.num_tokens, 0.0f)};
  const bf16_t* input = static_cast<const bf16_t*>(args.input);
  protoserve::work_pool::parallel_for(0, args.num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const bf16_t* x = input + m * args.input_stride;
      float absmax = 0.0f;
      for (int64_t k = 0; k < args.in_features; ++k)
        absmax = std::max(absmax, std::fabs(bf16_to_float(x[k])));
      // compressed-tensors' calculate_qparams: absmax / (255 / 2), a zero scale made eps.
      float scale = absmax / 127.5f;
      if (scale == 0.0f) scale = 1.1920928955078125e-07f;
      int8_t* a = rows.values.data() + m * k_pad;
      int32_t sum = 0;
      for (int64_t k = 0; k < args.in_features; ++k) {
        // Division (not a reciprocal's product) and half-to-even rounding, as torch.
        const float q = std::nearbyint(bf16_to_float(x[k]) / scale);
        const int32_t value = static_cast<int32_t>(std::min(127.0f, std::max(-128.0f, q)));
        a[k] = static_cast<int8_t>(value);
        sum += value;
      }
      rows.sums[m] = sum;
      rows.scales[m] = scale;
    }
  });
  return rows;
}

// Final value of one output: the same fused multiply-add in every kernel.
inline float finish(int32_t dot, float scale, float bias) {
  return std::fma(static_cast<float>(dot), scale, bias);
}

void run_scalar(const LinearW8A8Args& args, const QuantizedRows& rows) {
  const int64_t num_panels = ceil_div(args.out_features, kRows);
  const int64_t steps = args.padded_in_features / 4;
  const bf16_t* bias = static_cast<const bf16_t*>(args.bias);
  bf16_t* output = static_cast<bf16_t*>(args.output);
  protoserve::work_pool::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const uint8_t* panel = args.packed_weight + p * steps * kStepBytes;
      for (int64_t m = 0; m < args.num_tokens; ++m) {
        const int8_t* a = rows.values.data() + m * args.padded_in_features;
        int32_t dots[kRows] = {};
        for (int64_t s = 0; s < steps; ++s)
          for (int64_t r = 0; r < kRows; ++r)
            for (int64_t j = 0; j < 4; ++j)
              dots[r] += static_cast<int32_t>(panel[s * kStepBytes + 4 * r + j]) * a[4 * s + j];
        for (int64_t r = 0; r < kRows && p * kRows + r < args.out_features; ++r) {
          const int64_t n = p * kRows + r;
          const float scale = args.weight_scales[n] * rows.scales[m];
          const float b = bias != nullptr ? bf16_to_float(bias[n]) : 0.0f;
          output[m * args.output_stride + n] =
              float_to_bf16(finish(dots[r] - 128 * rows.sums[m], scale, b));
        }
      }
    }
  });
}

#if PROTOSERVE_AVX512_BF16
// 16 rows' int32 sums of token m -> bf16 outputs n0.., masked to the real rows.
inline void store_panel(const LinearW8A8Args& args, const QuantizedRows& rows, int64_t m,
                        int64_t p, __m512i dots) {
  const int64_t n0 = p * kRows;
  const int64_t valid = std::min<int64_t>(kRows, args.out_features - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512i corrected = _mm512_sub_epi32(dots, _mm512_set1_epi32(128 * rows.sums[m]));
  const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(args.weight_scales + n0),
                                     _mm512_set1_ps(rows.scales[m]));
  __m512 bias = _mm512_setzero_ps();
  if (args.bias != nullptr)
    bias = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
            mask, static_cast<const bf16_t*>(args.bias) + n0)), 16));
  const __m512 value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(corrected), scale, bias);
  _mm256_mask_storeu_epi16(static_cast<bf16_t*>(args.output) + m * args.output_stride + n0,
                           mask, (__m256i)_mm512_cvtneps_pbh(value));
}
#endif

#if PROTOSERVE_AVX512_BF16 && defined(__AVX512VNNI__)
#define PROTOSERVE_VNNI 1

// NP panels x MT tokens from token m0: one 64-byte load per panel and step, one vpdpbusd per
// token.
template <int NP, int MT>
void vnni_tile(const LinearW8A8Args& args, const QuantizedRows& rows, int64_t panel0,
               int64_t num_panels, int64_t m0) {
  const int64_t steps = args.padded_in_features / 4;
  __m512i acc[NP][MT];
  const uint8_t* panels[NP];
  for (int p = 0; p < NP; ++p) {
    panels[p] = args.packed_weight +
                (panel0 + std::min<int64_t>(p, num_panels - 1)) * steps * kStepBytes;
    for (int t = 0; t < MT; ++t) acc[p][t] = _mm512_setzero_si512();
  }
  const int32_t* a_rows[MT];
  for (int t = 0; t < MT; ++t)
    a_rows[t] = reinterpret_cast<const int32_t*>(rows.values.data() +
                                                 (m0 + t) * args.padded_in_features);
  const bool prefetch = m0 == 0;
  for (int64_t s = 0; s < steps; ++s) {
    for (int p = 0; p < NP; ++p) {
      const uint8_t* vec = panels[p] + s * kStepBytes;
      if (prefetch) __builtin_prefetch(vec + 4096, 0, 2);
      const __m512i weights = _mm512_loadu_si512(vec);
      for (int t = 0; t < MT; ++t)
        acc[p][t] = _mm512_dpbusd_epi32(acc[p][t], weights, _mm512_set1_epi32(a_rows[t][s]));
    }
  }
  for (int p = 0; p < NP && p < num_panels; ++p)
    for (int t = 0; t < MT; ++t) store_panel(args, rows, m0 + t, panel0 + p, acc[p][t]);
}

template <int NP, int MT>
void run_vnni(const LinearW8A8Args& args, const QuantizedRows& rows) {
  const int64_t num_panels = ceil_div(args.out_features, kRows);
  protoserve::work_pool::parallel_for(0, ceil_div(num_panels, NP), 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t panel0 = g * NP, count = std::min<int64_t>(NP, num_panels - panel0);
      int64_t m0 = 0;
      for (; m0 + MT <= args.num_tokens; m0 += MT) vnni_tile<NP, MT>(args, rows, panel0, count, m0);
      for (; m0 < args.num_tokens; ++m0) vnni_tile<NP, 1>(args, rows, panel0, count, m0);
    }
  });
}
#else
#define PROTOSERVE_VNNI 0
#endif

#if PROTOSERVE_AMX
#define PROTOSERVE_AMX_INT8_TARGET __attribute__((target("amx-tile,amx-int8")))

bool detect_amx_int8() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return ((edx >> 25) & 1) && panel_gemm::amx::amx_usable();  // AMX-INT8, tile permission
}

// Two panels x 32 tokens per tile step (C tiles 0-3, A 4-5, B 6-7, as panel_gemm_amx.h):
// C[token, row] += A[token, 64 k] . B[64 k, row], signed activations by unsigned weights.
PROTOSERVE_AMX_INT8_TARGET void amx_block(const LinearW8A8Args& args, const QuantizedRows& rows,
                                          const uint8_t* b0, const uint8_t* b1, int64_t m0,
                                          int32_t* out /* [2 token tiles][2 panels][16][16] */) {
  const int64_t k_pad = args.padded_in_features;
  const int8_t* a0 = rows.values.data() + m0 * k_pad;
  const int8_t* a1 = a0 + 16 * k_pad;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < k_pad / 64; ++kb) {
    _tile_loadd(4, a0 + kb * 64, k_pad);
    _tile_loadd(5, a1 + kb * 64, k_pad);
    _tile_loadd(6, b0 + kb * 16 * kStepBytes, kStepBytes);
    _tile_loadd(7, b1 + kb * 16 * kStepBytes, kStepBytes);
    _tile_dpbsud(0, 4, 6);
    _tile_dpbsud(1, 4, 7);
    _tile_dpbsud(2, 5, 6);
    _tile_dpbsud(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_stored(1, out + 256, 64);
  _tile_stored(2, out + 512, 64);
  _tile_stored(3, out + 768, 64);
}

void run_amx(const LinearW8A8Args& args, const QuantizedRows& rows) {
  const int64_t num_panels = ceil_div(args.out_features, kRows);
  const int64_t panel_bytes = args.padded_in_features / 4 * kStepBytes;
  protoserve::work_pool::parallel_for(0, ceil_div(num_panels, 2), 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t sums[4 * 256];
    panel_gemm::amx::load_tile_config();
    for (int64_t g = begin; g < end; ++g) {
      const int64_t p0 = 2 * g, count = std::min<int64_t>(2, num_panels - p0);
      const uint8_t* b0 = args.packed_weight + p0 * panel_bytes;
      const uint8_t* b1 = b0 + (count - 1) * panel_bytes;  // one panel: computed twice, unused
      for (int64_t m0 = 0; m0 < args.num_tokens; m0 += kAmxTokenBlock) {
        amx_block(args, rows, b0, b1, m0, sums);
        for (int64_t t = 0; t < kAmxTokenBlock && m0 + t < args.num_tokens; ++t)
          for (int64_t p = 0; p < count; ++p) {
            const int32_t* row = sums + ((t / 16) * 2 + p) * 256 + (t % 16) * 16;
            store_panel(args, rows, m0 + t, p0 + p,
                        _mm512_loadu_si512(reinterpret_cast<const void*>(row)));
          }
      }
    }
    panel_gemm::amx::release_tiles();
  });
}
#endif

enum class W8A8Kernel { kAuto, kVnni, kAmx, kScalar };

std::atomic<W8A8Kernel>& selected() {
  static std::atomic<W8A8Kernel> kernel{W8A8Kernel::kAuto};
  return kernel;
}

const char* kernel_name(W8A8Kernel kernel) {
  switch (kernel) {
    case W8A8Kernel::kVnni: return "vnni";
    case W8A8Kernel::kAmx: return "amx";
    case W8A8Kernel::kScalar: return "scalar";
    default: return "auto";
  }
}

}  // namespace

bool has_avx512_vnni() { return PROTOSERVE_VNNI != 0; }

bool has_amx_int8() {
#if PROTOSERVE_AMX
  static const bool usable = detect_amx_int8();
  return usable;
#else
  return false;
#endif
}

std::string set_w8a8_kernel(const std::string& name) {
  W8A8Kernel kernel;
  if (name == "auto") kernel = W8A8Kernel::kAuto;
  else if (name == "scalar") kernel = W8A8Kernel::kScalar;
  else if (name == "vnni" && has_avx512_vnni()) kernel = W8A8Kernel::kVnni;
  else if (name == "amx" && has_amx_int8()) kernel = W8A8Kernel::kAmx;
  else
    throw std::invalid_argument("w8a8 kernel must be auto, scalar" +
                                std::string(has_avx512_vnni() ? ", vnni" : "") +
                                (has_amx_int8() ? ", amx" : "") + " here, got '" + name + "'");
  return kernel_name(selected().exchange(kernel));
}

void linear_w8a8(const LinearW8A8Args& args) {
  W8A8Kernel kernel = selected().load(std::memory_order_relaxed);
  if (kernel == W8A8Kernel::kAuto)
    kernel = has_amx_int8() && args.num_tokens >= kW8A8AmxMinTokens ? W8A8Kernel::kAmx
             : has_avx512_vnni()                                   ? W8A8Kernel::kVnni
                                                                   : W8A8Kernel::kScalar;
  const int64_t padded_tokens =
      kernel == W8A8Kernel::kAmx ? round_up(args.num_tokens, kAmxTokenBlock) : args.num_tokens;
  const QuantizedRows rows = quantize_rows(args, padded_tokens);
#if PROTOSERVE_AMX
  if (kernel == W8A8Kernel::kAmx) return run_amx(args, rows);
#endif
#if PROTOSERVE_VNNI
  if (kernel == W8A8Kernel::kVnni)
    return args.num_tokens == 1 ? run_vnni<8, 1>(args, rows) : run_vnni<4, 4>(args, rows);
#endif
  run_scalar(args, rows);
}

}  // namespace protoserve
