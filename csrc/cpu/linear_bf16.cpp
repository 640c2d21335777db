// linear_bf16: out[M, N] = x[M, K] . W[N, K]^T (+ bias) in bfloat16 with fp32 accumulation.
//
// Decode reads every weight once per step, so its speed is the speed at which W streams from
// memory. W is packed once at load time into pair-column panels, and the tiles that multiply
// them are panel_gemm_avx512.h's (shared with the mixture-of-experts kernel, moe_bf16.cpp):
//
//   packed[p, k2, r, j] = W[16 p + r, 2 k2 + j]      shape [ceil(N / 16), K / 2, 16, 2]
//
// Threads split the panels into contiguous ranges, so each thread streams one run of memory;
// a thread's result does not depend on the thread count (each output is one accumulator
// summed in k order), so outputs are reproducible.
#include <algorithm>

#include "cpu_ops.h"
#include "panel_gemm_avx512.h"

namespace protoserve {

#if PROTOSERVE_AVX512_BF16
namespace {

using panel_gemm::kPanelRows;

template <int NP, int MT>
void run(const LinearArgs& args) {
  const int64_t num_panels = ceil_div(args.out_features, kPanelRows);
  const int64_t num_groups = ceil_div(num_panels, NP);
  const panel_gemm::PanelRun gemm{static_cast<const bf16_t*>(args.packed_weight),
                                  args.in_features, static_cast<const bf16_t*>(args.input),
                                  args.input_stride, args.num_tokens};
  const bf16_t* bias = static_cast<const bf16_t*>(args.bias);
  bf16_t* output = static_cast<bf16_t*>(args.output);
  at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
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
      panel_gemm::token_tiles<NP, MT>(gemm, panel0, group_panels, store);
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
