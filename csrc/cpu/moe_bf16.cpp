// moe_bf16: one mixture-of-experts layer (the experts of Mixtral / Qwen3-MoE) in one call.
//
//   1. counting sort of the T * k (token, expert) assignments by expert: each expert's rows
//      are one contiguous run, and the x rows are gathered into that order (T > 1 only);
//   2. gate/up GEMM per (expert, group of panels), silu(gate) * up fused into its epilogue
//      -> act [T * k, I] bf16;
//   3. down GEMM per (expert, group of panels), times the routing weight in its epilogue
//      -> contrib [T * k, H] fp32, at the assignment's own (t, j) row;
//   4. out[t] = bf16(sum over j of contrib[t, j]) in j order.
//
// Only experts with rows have work items, so at decode batch 1 only the top_k active experts'
// weights are read. Work items of all experts go to the threads from one shared counter
// (expert loads are uneven); each is a run of whole panels streamed contiguously.
//
// Experts with 4 or more rows run on AMX tiles where linear_bf16 would (panel_gemm_amx.h, same
// panels and epilogues) when the matrix's in_features is a multiple of 32: the rows are read
// in place, and a tile's rows past an expert's last one read the next expert's (or the
// buffers' 16 spare rows), computed and never stored.
//
// Roundings follow transformers' grouped experts forward (integrations/moe.py) in bf16: the
// gate/up projection, silu and the product are each rounded to bf16 (bf16 tensors), so is the
// down projection; the weighted output is rounded when the weights are bf16 (Qwen3-MoE) and
// kept fp32 when they are fp32 (Mixtral); the k terms are summed in fp32 and rounded once.
#include <memory>
#include <vector>

#include "moe_bf16.h"
#include "panel_gemm_amx.h"
#include "panel_gemm_avx512.h"
#include "vec_avx512.h"

namespace protoserve {

#if PROTOSERVE_AVX512_BF16
namespace {

using panel_gemm::kPanelRows;
using panel_gemm::PanelRun;

// Assignments (t * k + j) sorted by expert, stably: expert e's run is [offsets[e], offsets[e+1]).
struct Grouping {
  std::unique_ptr<int64_t[]> offsets;
  std::unique_ptr<int64_t[]> assignment;
};

Grouping group_by_expert(const MoeArgs& a) {
  const int64_t num_assignments = a.num_tokens * a.top_k;
  Grouping g{std::make_unique<int64_t[]>(a.num_experts + 1),
             std::make_unique<int64_t[]>(num_assignments)};
  for (int64_t e = 0; e <= a.num_experts; ++e) g.offsets[e] = 0;
  for (int64_t s = 0; s < num_assignments; ++s) ++g.offsets[a.expert_ids[s] + 1];
  for (int64_t e = 0; e < a.num_experts; ++e) g.offsets[e + 1] += g.offsets[e];
  std::unique_ptr<int64_t[]> next = std::make_unique<int64_t[]>(a.num_experts);
  for (int64_t e = 0; e < a.num_experts; ++e) next[e] = g.offsets[e];
  for (int64_t s = 0; s < num_assignments; ++s) g.assignment[next[a.expert_ids[s]]++] = s;
  return g;
}

// A run of whole panels of one expert's matrix, against every row of that expert.
struct WorkItem {
  int64_t expert;
  int64_t panel0;
  int64_t num_panels;
};

// Tile shapes by rows per expert, as linear_bf16 picks them by tokens: few rows are memory
// bound (more panels in flight), many compute bound (most multiplies per weight load). The
// gate/up tiles take whole (gate, up) panel pairs, so their panel counts are even.
enum class TileShape { kOneRow, kFewRows, kManyRows };

TileShape shape_for(int64_t rows) {
  return rows == 1 ? TileShape::kOneRow : rows <= 4 ? TileShape::kFewRows : TileShape::kManyRows;
}

constexpr int panels_per_item(TileShape shape, bool gate_up) {
  return shape == TileShape::kOneRow ? 8 : shape == TileShape::kFewRows ? 4 : gate_up ? 4 : 3;
}

std::vector<WorkItem> work_items(const Grouping& g, int64_t num_experts, int64_t num_panels,
                                 bool gate_up) {
  std::vector<WorkItem> items;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = g.offsets[e + 1] - g.offsets[e];
    if (rows == 0) continue;
    const int64_t step = panels_per_item(shape_for(rows), gate_up);
    for (int64_t p = 0; p < num_panels; p += step)
      items.push_back({e, p, std::min<int64_t>(step, num_panels - p)});
  }
  return items;
}

// Rows past an expert's last that an AMX tile may read (one 16-row tile minus one).
constexpr int64_t kSpareRows = 16;

// Runs `epilogue` over every row of the item's expert with the tile its row count calls for.
// The epilogue reads its panels from `part`: the item, or on AMX each pair of its panels.
template <bool kGateUp, typename Epilogue>
void run_item(const PanelRun& gemm, const WorkItem& item, WorkItem& part, Epilogue& epilogue) {
  part = item;
#if PROTOSERVE_AMX
  if (gemm.in_features % panel_gemm::amx::kTileK == 0 && amx_for_rows(gemm.num_tokens)) {
    namespace amx = panel_gemm::amx;
    const amx::AmxInput input{gemm.input, gemm.input_stride};
    const int64_t panel_stride = panel_gemm::panel_elements(gemm.in_features);
    amx::load_tile_config();
    for (int64_t p = 0; p < item.num_panels; p += 2) {
      part = {item.expert, item.panel0 + p, std::min<int64_t>(2, item.num_panels - p)};
      const amx::PanelTiles panels[2] = {
          {gemm.weight + part.panel0 * panel_stride, nullptr},
          {gemm.weight + (part.panel0 + part.num_panels - 1) * panel_stride, nullptr}};
      if (part.num_panels == 2)
        amx::token_blocks<2>(input, gemm.in_features, gemm.num_tokens, panels, epilogue);
      else
        amx::token_blocks<1>(input, gemm.in_features, gemm.num_tokens, panels, epilogue);
    }
    amx::release_tiles();
    return;
  }
#endif
  switch (shape_for(gemm.num_tokens)) {
    case TileShape::kOneRow:
      panel_gemm::token_tiles<8, 1>(gemm, item.panel0, item.num_panels, epilogue);
      break;
    case TileShape::kFewRows:
      panel_gemm::token_tiles<4, 4>(gemm, item.panel0, item.num_panels, epilogue);
      break;
    case TileShape::kManyRows:
      if constexpr (kGateUp) {
        panel_gemm::token_tiles<4, 6>(gemm, item.panel0, item.num_panels, epilogue);
      } else {
        panel_gemm::token_tiles<3, 8>(gemm, item.panel0, item.num_panels, epilogue);
      }
      break;
  }
}

// silu(gate) * up for 16 columns, rounded where torch's bf16 tensors round.
inline __m512 silu_and_mul(__m512 gate_sum, __m512 up_sum) {
  const __m512 gate = panel_gemm::round_bf16(gate_sum);
  const __m512 up = panel_gemm::round_bf16(up_sum);
  const __m512 exp_neg = vec::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate));
  const __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_neg));
  return _mm512_mul_ps(panel_gemm::round_bf16(silu), up);
}

}  // namespace

void moe_bf16(const MoeArgs& a) {
  const int64_t H = a.hidden, I = a.intermediate;
  const int64_t num_assignments = a.num_tokens * a.top_k;
  const int64_t inter_panels = ceil_div(I, kPanelRows);
  const int64_t hidden_panels = ceil_div(H, kPanelRows);
  const int64_t gate_up_stride = 2 * inter_panels * panel_gemm::panel_elements(H);
  const int64_t down_stride = hidden_panels * panel_gemm::panel_elements(I);
  const Grouping g = group_by_expert(a);

  // One token (decode batch 1): every row is that token's, so the GEMMs read it in place
  // through a zero row stride instead of a gathered copy.
  std::unique_ptr<bf16_t[]> gathered;
  const bf16_t* rows = a.input;
  int64_t row_stride = 0;
  if (a.num_tokens > 1) {
    gathered.reset(new bf16_t[(num_assignments + kSpareRows) * H]);
    protoserve::work_pool::parallel_for(0, num_assignments, 64, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s)
        std::copy_n(a.input + (g.assignment[s] / a.top_k) * a.input_stride, H,
                    gathered.get() + s * H);
    });
    rows = gathered.get();
    row_stride = H;
  }

  std::unique_ptr<bf16_t[]> act(new bf16_t[(num_assignments + kSpareRows) * I]);
  const std::vector<WorkItem> gate_up_items = work_items(g, a.num_experts, 2 * inter_panels, true);
  for_each_unit(static_cast<int64_t>(gate_up_items.size()), [] { return 0; },
                [&](int64_t unit, int) {
    const WorkItem& item = gate_up_items[unit];
    const int64_t first = g.offsets[item.expert];
    const PanelRun gemm{a.gate_up + item.expert * gate_up_stride, H, rows + first * row_stride,
                        row_stride, g.offsets[item.expert + 1] - first};
    bf16_t* act_rows = act.get() + first * I;
    WorkItem part = item;
    auto fused_silu = [&](int64_t m, const __m512* sums) {
      for (int64_t j = 0; 2 * j < part.num_panels; ++j) {
        const int64_t n0 = (part.panel0 / 2 + j) * kPanelRows;
        _mm256_mask_storeu_epi16(act_rows + m * I + n0, panel_gemm::row_mask(I - n0),
                                 panel_gemm::to_bf16(silu_and_mul(sums[2 * j], sums[2 * j + 1])));
      }
    };
    run_item<true>(gemm, item, part, fused_silu);
  });

  std::unique_ptr<float[]> contrib(new float[num_assignments * H]);
  const std::vector<WorkItem> down_items = work_items(g, a.num_experts, hidden_panels, false);
  for_each_unit(static_cast<int64_t>(down_items.size()), [] { return 0; },
                [&](int64_t unit, int) {
    const WorkItem& item = down_items[unit];
    const int64_t first = g.offsets[item.expert];
    const PanelRun gemm{a.down + item.expert * down_stride, I, act.get() + first * I, I,
                        g.offsets[item.expert + 1] - first};
    WorkItem part = item;
    auto weighted = [&](int64_t m, const __m512* sums) {
      const int64_t assignment = g.assignment[first + m];
      const __m512 weight = _mm512_set1_ps(a.weights[assignment]);
      float* dst = contrib.get() + assignment * H;
      for (int64_t p = 0; p < part.num_panels; ++p) {
        const int64_t n0 = (part.panel0 + p) * kPanelRows;
        __m512 value = _mm512_mul_ps(panel_gemm::round_bf16(sums[p]), weight);
        if (a.round_weighted) value = panel_gemm::round_bf16(value);
        _mm512_mask_storeu_ps(dst + n0, panel_gemm::row_mask(H - n0), value);
      }
    };
    run_item<false>(gemm, item, part, weighted);
  });

  // Decode-sized sums run inline on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.top_k * H, 1));
  protoserve::work_pool::parallel_for(0, a.num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* terms = contrib.get() + t * a.top_k * H;
      for (int64_t n0 = 0; n0 < H; n0 += kPanelRows) {
        const __mmask16 mask = panel_gemm::row_mask(H - n0);
        __m512 sum = _mm512_maskz_loadu_ps(mask, terms + n0);
        for (int64_t j = 1; j < a.top_k; ++j)
          sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, terms + j * H + n0));
        _mm256_mask_storeu_epi16(a.output + t * H + n0, mask, panel_gemm::to_bf16(sum));
      }
    }
  });
}

#else

void moe_bf16(const MoeArgs&) {}  // never called: has_avx512_bf16() is false

#endif

}  // namespace protoserve
