// linear_bf16: out[M, N] = x[M, K] . W[N, K]^T (+ bias) in bfloat16 with fp32 accumulation.
//
// Decode reads every weight once per step, so its speed is the speed at which W streams from
// memory. W is packed once at load time into pair-column panels, and the tiles that multiply
// them are panel_gemm_avx512.h's (shared with the mixture-of-experts kernel, moe_bf16.cpp):
//
//   packed[p, k2, r, j] = W[16 p + r, 2 k2 + j]      shape [ceil(N / 16), K / 2, 16, 2]
//
// With many tokens the GEMM is compute bound, and where the CPU has AMX the same panels feed
// panel_gemm_amx.h's tile kernel instead (the panels already are AMX's B-tile layout), so one
// weight copy serves both regimes. PROTOSERVE_LINEAR_KERNEL (auto | avx512 | amx) or
// set_linear_kernel() pins one kernel; auto takes AMX from kAmxMinTokens tokens on.
//
// Threads split the panels into contiguous ranges, so each thread streams one run of memory;
// a thread's result does not depend on the thread count (each output is one accumulator
// summed in k order), so outputs are reproducible.
#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "panel_gemm_amx.h"
#include "panel_gemm_avx512.h"

namespace protoserve {

#if PROTOSERVE_AVX512_BF16
namespace {

using panel_gemm::kPanelRows;

// The epilogue of both kernels for the panels [panel0, panel0 + group_panels): bias, one
// rounding to bf16, and a store masked to the real out_features.
inline auto store_rows(const LinearArgs& args, int64_t panel0, int64_t group_panels) {
  const bf16_t* bias = static_cast<const bf16_t*>(args.bias);
  bf16_t* output = static_cast<bf16_t*>(args.output);
  return [&args, bias, output, panel0, group_panels](int64_t m, const __m512* sums) {
    panel_gemm::store_bf16_row(output, args.output_stride, args.out_features, bias, panel0,
                               group_panels, m, sums);
  };
}

template <int NP, int MT>
void run(const LinearArgs& args) {
  const int64_t num_panels = ceil_div(args.out_features, kPanelRows);
  const int64_t num_groups = ceil_div(num_panels, NP);
  const panel_gemm::PanelRun gemm{static_cast<const bf16_t*>(args.packed_weight),
                                  args.in_features, static_cast<const bf16_t*>(args.input),
                                  args.input_stride, args.num_tokens};
  protoserve::work_pool::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t panel0 = g * NP;
      const int64_t group_panels = std::min<int64_t>(NP, num_panels - panel0);
      auto store = store_rows(args, panel0, group_panels);
      panel_gemm::token_tiles<NP, MT>(gemm, panel0, group_panels, store);
    }
  });
}

void run_avx512(const LinearArgs& args) {
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

#if PROTOSERVE_AMX
namespace amx = panel_gemm::amx;

// Pairs of panels (32 outputs, two B tiles) per group; every token of the call per group, so
// a group's weights come from memory once and from L2 for the following 32-token blocks.
void run_amx(const LinearArgs& args) {
  const int64_t in_features = args.in_features;
  std::vector<bf16_t> padded;
  const amx::AmxInput tiles_input = amx::tile_input(
      static_cast<const bf16_t*>(args.input), args.input_stride, args.num_tokens, in_features,
      padded);
  const bool has_tail = in_features % amx::kTileK != 0;
  const bf16_t* weight = static_cast<const bf16_t*>(args.packed_weight);
  const int64_t panel_stride = panel_gemm::panel_elements(in_features);
  const int64_t num_panels = ceil_div(args.out_features, kPanelRows);
  const int64_t num_groups = ceil_div(num_panels, int64_t{2});
  protoserve::work_pool::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
    amx::load_tile_config();
    alignas(64) bf16_t tails[2][amx::kTileRows * amx::kTileK];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t panel0 = g * 2;
      const int64_t group_panels = std::min<int64_t>(2, num_panels - panel0);
      amx::PanelTiles panels[2];
      for (int64_t p = 0; p < group_panels; ++p) {
        panels[p].panel = weight + (panel0 + p) * panel_stride;
        panels[p].tail = nullptr;
        if (has_tail) {
          amx::copy_tail(panels[p].panel, in_features, tails[p]);
          panels[p].tail = tails[p];
        }
      }
      auto store = store_rows(args, panel0, group_panels);
      if (group_panels == 2)
        amx::token_blocks<2>(tiles_input, in_features, args.num_tokens, panels, store);
      else
        amx::token_blocks<1>(tiles_input, in_features, args.num_tokens, panels, store);
    }
    amx::release_tiles();
  });
}
#endif

// From this many tokens AMX is faster even though its 16-row tiles are mostly padding: 1.1-1.15x
// at 4-6 tokens and 1.35x at 8 over the benchmark model's layers (2026-12-07, Xeon with AMX);
// below it both kernels stream the weights at the same speed, so batch 1 keeps the AVX512 one.
constexpr int64_t kAmxMinTokens = 4;

enum class LinearKernel { kAuto, kAvx512, kAmx };

LinearKernel parse_kernel(const std::string& name, const char* setting) {
  if (name == "auto") return LinearKernel::kAuto;
  if (name == "avx512") return LinearKernel::kAvx512;
  if (name == "amx") {
    if (!has_amx_bf16())
      throw std::invalid_argument(std::string(setting) +
                                  "=amx, but this CPU or OS does not allow AMX-BF16");
    return LinearKernel::kAmx;
  }
  throw std::invalid_argument(std::string(setting) + " must be auto, avx512 or amx, got '" +
                              name + "'");
}

const char* kernel_name(LinearKernel kernel) {
  switch (kernel) {
    case LinearKernel::kAvx512: return "avx512";
    case LinearKernel::kAmx: return "amx";
    default: return "auto";
  }
}

// The process-wide choice; starts from PROTOSERVE_LINEAR_KERNEL, read once.
std::atomic<LinearKernel>& selected_kernel() {
  static std::atomic<LinearKernel> kernel{[] {
    const char* env = std::getenv("PROTOSERVE_LINEAR_KERNEL");
    return env == nullptr || *env == '\0' ? LinearKernel::kAuto
                                          : parse_kernel(env, "PROTOSERVE_LINEAR_KERNEL");
  }()};
  return kernel;
}

}  // namespace

#if PROTOSERVE_AMX
bool amx_for_rows(int64_t rows) {
  const LinearKernel kernel = selected_kernel().load(std::memory_order_relaxed);
  return kernel == LinearKernel::kAmx ||
         (kernel == LinearKernel::kAuto && rows >= kAmxMinTokens && has_amx_bf16());
}
#endif

void linear_bf16(const LinearArgs& args) {
#if PROTOSERVE_AMX
  if (amx_for_rows(args.num_tokens)) return run_amx(args);
#endif
  run_avx512(args);
}

std::string set_linear_kernel(const std::string& name) {
  const LinearKernel kernel = parse_kernel(name, "linear kernel");
  return kernel_name(selected_kernel().exchange(kernel));
}

bool has_amx_bf16() {
#if PROTOSERVE_AMX
  return panel_gemm::amx::amx_usable();
#else
  return false;
#endif
}

#else

void linear_bf16(const LinearArgs&) {}  // never called: has_avx512_bf16() is false
std::string set_linear_kernel(const std::string&) { return "avx512"; }
bool has_amx_bf16() { return false; }

#endif

}  // namespace protoserve
