// linear_int for prefill-sized calls, and the weights' dequantization to bf16 panels.
//
// From kPrefillRows rows a call is compute bound, and AMX's bf16 tiles beat converting the
// integers once per few tokens. Multiplying a transient bf16 copy of the whole weight (the
// earlier way) wrote and re-read 2 bytes per weight through memory and allocated it per call
// (1.1-1.2 ms against 0.5 ms of bf16 for a 4096 x 1536 projection at 64 tokens); here each work
// item dequantizes two panels (2 x 16 rows x K, 256 KiB at K = 4096: L2-resident, per thread)
// and runs the AMX panel micro-kernel (panel_gemm_amx.h) over every token of the call on them,
// so the weights leave memory once, as integers. Values are the same bf16 weights as the
// copy's (torch's `(Q.float() * scale).to(bfloat16)`), so results equal the copy's path.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_types.h"
#include "linear_int.h"
#include "linear_int_groups.h"
#include "panel_gemm_amx.h"
#include "panel_gemm_avx512.h"
#include "work_pool.h"

namespace protoserve {

#if PROTOSERVE_AVX512_BF16
namespace {

using panel_gemm::kPanelRows;
using int_groups::group_offset;
using int_groups::group_scale;
using int_groups::value_bias;

constexpr int64_t kPrefillRows = 16;  // engine/layers/quant/panels.py's DEQUANTIZE_ROWS

// Bytes of one step of linear_int's panels: 32 (int8: 2 columns, int4: 4), 6-bit 48.
template <int BITS>
constexpr int64_t step_bytes() {
  return BITS == 6 ? 48 : 32;
}

// One panel back to linear_bf16's bf16 pair-column layout, each weight rounded as torch's
// `(Q.float() * scale).to(bfloat16)`.
template <int BITS>
void dequantize_panel(const LinearIntArgs& args, int64_t panel, bf16_t* out) {
  const int64_t pairs = args.in_features / 2;
  const int64_t steps = pairs / (BITS == 8 ? 1 : 2);
  const __m512i shifts = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004,
                                          0x0004000400040004, 0x0004000400040004, 0, 0, 0, 0);
  const int64_t num_groups = ceil_div(args.in_features, args.group_size);
  const __m512i rows_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i rows_hi = _mm512_add_epi32(rows_lo, _mm512_set1_epi32(8));
  const __m512i offset = _mm512_set1_epi32(value_bias(args));
  const uint8_t* bytes = args.packed_weight + panel * steps * step_bytes<BITS>();
  __m512 scale_lo = _mm512_setzero_ps(), scale_hi = _mm512_setzero_ps();
  __m512 offset_lo = _mm512_setzero_ps(), offset_hi = _mm512_setzero_ps();
  int64_t group = -1;
  // One pair of columns: unsigned values of elements 0-15 and 16-31 -> 32 bf16 weights.
  auto pair_out = [&](int64_t k2, __m512i first, __m512i second) {
    const int64_t g = 2 * k2 / args.group_size;
    if (g != group) {
      group = g;
      const __m512 s = group_scale(args, panel, g, num_groups);
      scale_lo = _mm512_permutexvar_ps(rows_lo, s);
      scale_hi = _mm512_permutexvar_ps(rows_hi, s);
      if (args.offsets.data != nullptr || (args.super != nullptr && args.super->mins)) {
        const __m512 o = group_offset(args, panel, g, num_groups);
        offset_lo = _mm512_permutexvar_ps(rows_lo, o);
        offset_hi = _mm512_permutexvar_ps(rows_hi, o);
      }
    }
    // Symmetric weights keep offset 0: Q * scale + 0 is the product's own rounding.
    const __m512 w_lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(first, offset)),
                                        scale_lo, offset_lo);
    const __m512 w_hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(second, offset)),
                                        scale_hi, offset_hi);
    _mm512_storeu_si512(out + k2 * 2 * kPanelRows, (__m512i)_mm512_cvtne2ps_pbh(w_hi, w_lo));
  };
  for (int64_t s = 0; s < steps; ++s) {
    const __m256i raw =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + s * step_bytes<BITS>()));
    if constexpr (BITS == 8) {
      pair_out(s, _mm512_cvtepu8_epi32(_mm256_castsi256_si128(raw)),
               _mm512_cvtepu8_epi32(_mm256_extracti128_si256(raw, 1)));
    } else {
      const __m512i words = _mm512_cvtepu8_epi16(raw);
      __m512i low = _mm512_and_si512(words, _mm512_set1_epi16(0x000F));
      __m512i high = _mm512_srli_epi16(words, 4);
      if constexpr (BITS == 6) {  // + 16 h: the high bits of both pairs
        const __m512i top = _mm512_srlv_epi16(
            _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(
                reinterpret_cast<const __m128i*>(bytes + s * step_bytes<BITS>() + 32)))),
            shifts);
        const __m512i two_bits = _mm512_set1_epi16(0x0003);
        low = _mm512_add_epi16(low, _mm512_slli_epi16(_mm512_and_si512(top, two_bits), 4));
        high = _mm512_add_epi16(
            high, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(top, 2), two_bits), 4));
      }
      pair_out(2 * s, _mm512_cvtepu16_epi32(_mm512_castsi512_si256(low)),
               _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(low, 1)));
      pair_out(2 * s + 1, _mm512_cvtepu16_epi32(_mm512_castsi512_si256(high)),
               _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(high, 1)));
    }
  }
}


void dequantize_any(const LinearIntArgs& args, int64_t panel, bf16_t* out) {
  if (args.bits == 8) {
    dequantize_panel<8>(args, panel, out);
  } else if (args.bits == 6) {
    dequantize_panel<6>(args, panel, out);
  } else {
    dequantize_panel<4>(args, panel, out);
  }
}

#if PROTOSERVE_AMX
namespace amx = panel_gemm::amx;

void run_prefill(const LinearIntArgs& args) {
  const int64_t in_features = args.in_features;
  std::vector<bf16_t> padded;
  const amx::AmxInput tiles_input = amx::tile_input(
      static_cast<const bf16_t*>(args.input), args.input_stride, args.num_tokens, in_features,
      padded);
  const bool has_tail = in_features % amx::kTileK != 0;
  const int64_t panel_stride = panel_gemm::panel_elements(in_features);
  const int64_t num_panels = ceil_div(args.out_features, kPanelRows);
  const bf16_t* bias = static_cast<const bf16_t*>(args.bias);
  bf16_t* output = static_cast<bf16_t*>(args.output);
  work_pool::parallel_for(0, ceil_div(num_panels, int64_t{2}), 1, [&](int64_t begin,
                                                                       int64_t end) {
    // This thread's two panels, kept between calls (no allocation per call).
    thread_local std::vector<bf16_t> scratch;
    if (scratch.size() < static_cast<size_t>(2 * panel_stride)) scratch.resize(2 * panel_stride);
    alignas(64) bf16_t tails[2][amx::kTileRows * amx::kTileK];
    amx::load_tile_config();
    for (int64_t g = begin; g < end; ++g) {
      const int64_t panel0 = 2 * g;
      const int64_t count = std::min<int64_t>(2, num_panels - panel0);
      amx::PanelTiles panels[2];
      for (int64_t p = 0; p < count; ++p) {
        bf16_t* panel = scratch.data() + p * panel_stride;
        dequantize_any(args, panel0 + p, panel);
        panels[p].panel = panel;
        panels[p].tail = nullptr;
        if (has_tail) {
          amx::copy_tail(panel, in_features, tails[p]);
          panels[p].tail = tails[p];
        }
      }
      auto store = [&](int64_t m, const __m512* sums) {
        panel_gemm::store_bf16_row(output, args.output_stride, args.out_features, bias,
                                   panel0, count, m, sums);
      };
      if (count == 2)
        amx::token_blocks<2>(tiles_input, in_features, args.num_tokens, panels, store);
      else
        amx::token_blocks<1>(tiles_input, in_features, args.num_tokens, panels, store);
    }
    amx::release_tiles();
  });
}
#endif

}  // namespace

bool int_prefill_on_tiles(int64_t rows) {
#if PROTOSERVE_AMX
  return rows >= kPrefillRows && amx_for_rows(rows);
#else
  (void)rows;
  return false;
#endif
}

bool linear_int_prefill(const LinearIntArgs& args) {
  if (!int_prefill_on_tiles(args.num_tokens)) return false;
#if PROTOSERVE_AMX
  run_prefill(args);
  return true;
#else
  return false;
#endif
}

void dequantize_int_panels(const LinearIntArgs& args, void* out) {
  const int64_t num_panels = ceil_div(args.out_features, kPanelRows);
  const int64_t panel_elements = panel_gemm::panel_elements(args.in_features);
  bf16_t* panels = static_cast<bf16_t*>(out);
  protoserve::work_pool::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) dequantize_any(args, p, panels + p * panel_elements);
  });
}


#else

bool int_prefill_on_tiles(int64_t) { return false; }
bool linear_int_prefill(const LinearIntArgs&) { return false; }
void dequantize_int_panels(const LinearIntArgs&, void*) {}

#endif

}  // namespace protoserve
