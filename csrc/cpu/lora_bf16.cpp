// lora_bf16: every row's own adapter added into a projection's output, rows of several
// adapters (and of the base model) in one call.
//
// The torch path (engine/layers/lora.py) shrinks every row against every slot and zeroes the
// columns of the other slots with a one-hot mask: a step with 4 adapters does 4x the LoRA
// work it needs, plus the base rows' share. Here rows are gathered by slot instead, so each
// row meets only its own adapter's factors and base rows cost nothing:
//
//   shrink  s[t, j] = round_bf16(x[t] . A_sj^T)     [rank_sj] per row t of slot s, slice j
//   expand  out[t, slice j] = round_bf16(out[t, slice j] + s[t, j] . B_sj^T)
//
// the same two roundings as the torch path (its bf16 `x @ A^T`, then `out.addmm_`), fp32
// accumulation in between, so the two agree up to fp32 summation order. Rows of one slot go
// in blocks of kRowBlock so each A and B vector loaded serves several rows; slices an
// adapter does not target (rank 0) and the zero padding up to max_rank are skipped.
#include <algorithm>
#include <vector>

#include "lora_bf16.h"
#include "vec_avx512.h"

namespace protoserve {

#if PROTOSERVE_AVX512_BF16
namespace {

constexpr int kRowBlock = 4;  // rows of one slot sharing each weight vector
constexpr int kRankTile = 4;  // A rows per shrink tile: kRowBlock x kRankTile accumulators
constexpr int kExpandVectors = 4;                  // 64 output columns per expand tile
constexpr int64_t kExpandChunk = 16 * kExpandVectors * 4;  // columns per work unit

struct RowBlock {
  int64_t slot;
  int count;
  int64_t rows[kRowBlock];
};

// Rows with an adapter, grouped by slot (in row order within a slot), cut into blocks.
std::vector<RowBlock> gather_rows(const LoRAArgs& args) {
  std::vector<std::vector<int64_t>> by_slot(args.num_slots);
  for (int64_t t = 0; t < args.num_tokens; ++t)
    if (args.row_slots[t] >= 0) by_slot[args.row_slots[t]].push_back(t);
  std::vector<RowBlock> blocks;
  for (int64_t s = 0; s < args.num_slots; ++s) {
    const std::vector<int64_t>& rows = by_slot[s];
    for (size_t first = 0; first < rows.size(); first += kRowBlock) {
      RowBlock block{s, static_cast<int>(std::min<size_t>(kRowBlock, rows.size() - first)), {}};
      for (int r = 0; r < block.count; ++r) block.rows[r] = rows[first + r];
      blocks.push_back(block);
    }
  }
  return blocks;
}

inline int32_t rank_of(const LoRAArgs& args, int64_t slot, int64_t slice) {
  return args.weights.ranks[slot * args.num_slices + slice];
}

// shrunk[r * stacked + j * R + i] for the block's rows r and A rows i in [i0, i0 + count_a)
// of slice j: dot products over in_features, 32 bf16 pairs per dpbf16, one horizontal sum
// of all 16 accumulators at the end.
void shrink_tile(const LoRAArgs& args, const RowBlock& block, const bf16_t* a_first,
                 int count_a, float* shrunk) {
  const int64_t k_total = args.in_features;
  const bf16_t* x[kRowBlock];
  const bf16_t* w[kRankTile];
  // Missing rows / A rows alias the first: loads stay in bounds, their sums are dropped.
  for (int r = 0; r < kRowBlock; ++r)
    x[r] = args.input + block.rows[r < block.count ? r : 0] * args.input_stride;
  for (int i = 0; i < kRankTile; ++i) w[i] = a_first + (i < count_a ? i : 0) * k_total;
  __m512 acc[kRowBlock * kRankTile];
  for (__m512& v : acc) v = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_total; k += 32) {
    const int count = static_cast<int>(std::min<int64_t>(32, k_total - k));
    __m512bh wv[kRankTile];
    for (int i = 0; i < kRankTile; ++i) wv[i] = (__m512bh)vec::load_bf16x32(w[i] + k, count);
    for (int r = 0; r < kRowBlock; ++r) {
      const __m512bh xv = (__m512bh)vec::load_bf16x32(x[r] + k, count);
      for (int i = 0; i < kRankTile; ++i)
        acc[r * kRankTile + i] = _mm512_dpbf16_ps(acc[r * kRankTile + i], xv, wv[i]);
    }
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, vec::hsum16(acc));
  const int64_t stacked = args.num_slices * args.max_rank;
  for (int r = 0; r < block.count; ++r)
    for (int i = 0; i < count_a; ++i)
      shrunk[r * stacked + i] = bf16_to_float(float_to_bf16(sums[r * kRankTile + i]));
}

void shrink_block(const LoRAArgs& args, const RowBlock& block, float* shrunk) {
  const int64_t stacked = args.num_slices * args.max_rank;
  for (int64_t j = 0; j < args.num_slices; ++j) {
    const int rank = rank_of(args, block.slot, j);
    const bf16_t* a_slice =
        args.weights.a + (block.slot * stacked + j * args.max_rank) * args.in_features;
    for (int i0 = 0; i0 < rank; i0 += kRankTile)
      shrink_tile(args, block, a_slice + i0 * args.in_features, std::min(kRankTile, rank - i0),
                  shrunk + j * args.max_rank + i0);
  }
}

inline __mmask16 column_mask(int64_t valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xffff)
                     : static_cast<__mmask16>((1u << std::max<int64_t>(valid, 0)) - 1);
}

// Columns [c0, c1) of slice j for the block's MR rows: per 64-column tile, MR x 4 fp32
// accumulators over the slice's rank, then out + sum rounded once.
template <int MR>
void expand_columns(const LoRAArgs& args, const RowBlock& block, int64_t j, int64_t c0,
                    int64_t c1, const float* shrunk, int64_t out_features) {
  const int64_t stacked = args.num_slices * args.max_rank;
  const int rank = rank_of(args, block.slot, j);
  const bf16_t* b_first = args.weights.b_t + (block.slot * stacked + j * args.max_rank) *
                                                 out_features;
  for (int64_t c = c0; c < c1; c += 16 * kExpandVectors) {
    __mmask16 masks[kExpandVectors];
    for (int v = 0; v < kExpandVectors; ++v) masks[v] = column_mask(c1 - c - 16 * v);
    __m512 acc[MR][kExpandVectors];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kExpandVectors; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int i = 0; i < rank; ++i) {
      const bf16_t* b_row = b_first + i * out_features + c;
      __m512 bv[kExpandVectors];
      for (int v = 0; v < kExpandVectors; ++v)
        bv[v] = vec::bf16x16_to_ps(_mm256_maskz_loadu_epi16(masks[v], b_row + 16 * v));
      for (int r = 0; r < MR; ++r) {
        const __m512 weight = _mm512_set1_ps(shrunk[r * stacked + j * args.max_rank + i]);
        for (int v = 0; v < kExpandVectors; ++v)
          acc[r][v] = _mm512_fmadd_ps(weight, bv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      bf16_t* out = args.output + block.rows[r] * args.output_stride + c;
      for (int v = 0; v < kExpandVectors; ++v) {
        if (masks[v] == 0) break;
        const __m512 base = vec::bf16x16_to_ps(_mm256_maskz_loadu_epi16(masks[v], out + 16 * v));
        _mm256_mask_storeu_epi16(out + 16 * v, masks[v],
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(base, acc[r][v])));
      }
    }
  }
}

struct ExpandUnit {
  int64_t block;
  int64_t slice;
  int64_t c0, c1;
};

}  // namespace

void lora_bf16(const LoRAArgs& args) {
  const std::vector<RowBlock> blocks = gather_rows(args);
  if (blocks.empty()) return;
  const int64_t stacked = args.num_slices * args.max_rank;
  const int64_t block_stride = kRowBlock * stacked;
  // Every block's shrunk rows, [blocks, kRowBlock, n * R], read by its expand units.
  std::vector<float> shrunk(blocks.size() * block_stride, 0.0f);
  for_each_unit(
      static_cast<int64_t>(blocks.size()), [] { return 0; },
      [&](int64_t b, int) { shrink_block(args, blocks[b], shrunk.data() + b * block_stride); });

  std::vector<int64_t> offsets(args.num_slices + 1, 0);
  for (int64_t j = 0; j < args.num_slices; ++j) offsets[j + 1] = offsets[j] + args.slice_sizes[j];
  const int64_t out_features = offsets[args.num_slices];
  std::vector<ExpandUnit> units;
  for (size_t b = 0; b < blocks.size(); ++b)
    for (int64_t j = 0; j < args.num_slices; ++j) {
      if (rank_of(args, blocks[b].slot, j) == 0) continue;
      for (int64_t c = offsets[j]; c < offsets[j + 1]; c += kExpandChunk)
        units.push_back({static_cast<int64_t>(b), j, c, std::min(c + kExpandChunk, offsets[j + 1])});
    }
  for_each_unit(
      static_cast<int64_t>(units.size()), [] { return 0; }, [&](int64_t u, int) {
        const ExpandUnit& unit = units[u];
        const RowBlock& block = blocks[unit.block];
        const float* rows = shrunk.data() + unit.block * block_stride;
        switch (block.count) {
          case 1: return expand_columns<1>(args, block, unit.slice, unit.c0, unit.c1, rows, out_features);
          case 2: return expand_columns<2>(args, block, unit.slice, unit.c0, unit.c1, rows, out_features);
          case 3: return expand_columns<3>(args, block, unit.slice, unit.c0, unit.c1, rows, out_features);
          default: return expand_columns<4>(args, block, unit.slice, unit.c0, unit.c1, rows, out_features);
        }
      });
}

#else

void lora_bf16(const LoRAArgs&) {}  // never called: has_avx512_bf16() is false

#endif

}  // namespace protoserve
