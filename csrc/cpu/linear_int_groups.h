// Per (row, group) scales and offsets of linear_int's panels, as 16-row fp32 vectors: shared by
// the bf16-activation kernel (linear_int.cpp) and the int8-activation one (linear_int_vnni.cpp).
// Plain group values (fp32 or exact fp16) or GGUF K-quants' two-level scales (SuperBlockScales).
#pragma once

#include "cpu_types.h"
#include "linear_int.h"

#if PROTOSERVE_AVX512_BF16

namespace protoserve::int_groups {

constexpr int64_t kPanelRows = 16;

// 16 rows' values of one group: fp16 widened exactly to fp32, or fp32 as stored.
inline __m512 load_group(const GroupValues& values, int64_t index) {
  if (values.half)
    return _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(values.data) + index)));
  return _mm512_loadu_ps(static_cast<const float*>(values.data) + index);
}

// 16 rows' K-quant scale (or, for the mins, negated offset) of group g: integers times the
// super-block's fp16 factor.
inline __m512 load_super(const void* ints, bool is_signed, const uint16_t* factors,
                         int64_t groups_per_block, int64_t panel, int64_t g,
                         int64_t num_groups) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
      static_cast<const uint8_t*>(ints) + (panel * num_groups + g) * kPanelRows));
  const __m512 values = _mm512_cvtepi32_ps(is_signed ? _mm512_cvtepi8_epi32(raw)
                                                     : _mm512_cvtepu8_epi32(raw));
  const int64_t blocks = ceil_div(num_groups, groups_per_block);
  const __m512 factor = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
      factors + (panel * blocks + g / groups_per_block) * kPanelRows)));
  return _mm512_mul_ps(values, factor);
}

// The scale and offset of 16 rows in group g, from plain group values or K-quant scales.
inline __m512 group_scale(const LinearIntArgs& args, int64_t panel, int64_t g,
                          int64_t num_groups) {
  if (args.super != nullptr)
    return load_super(args.super->scales, args.super->signed_scales, args.super->d,
                      args.super->groups_per_block, panel, g, num_groups);
  return load_group(args.scales, (panel * num_groups + g) * kPanelRows);
}

inline __m512 group_offset(const LinearIntArgs& args, int64_t panel, int64_t g,
                           int64_t num_groups) {
  if (args.super != nullptr)  // -(dmin * m): the product exact, its negation too
    return _mm512_sub_ps(_mm512_setzero_ps(),
                         load_super(args.super->mins, false, args.super->dmin,
                                    args.super->groups_per_block, panel, g, num_groups));
  return load_group(args.offsets, (panel * num_groups + g) * kPanelRows);
}

}  // namespace protoserve::int_groups

#endif

namespace protoserve::int_groups {

// The integer bias of the stored values: 2^(bits - 1), 0 for K-quants with mins (unsigned).
inline int value_bias(const LinearIntArgs& args) {
  return args.super != nullptr && args.super->mins != nullptr ? 0 : 1 << (args.bits - 1);
}

// Whether the weight has offsets (zero points, or K-quant mins).
inline bool has_offsets(const LinearIntArgs& args) {
  return args.offsets.data != nullptr || (args.super != nullptr && args.super->mins != nullptr);
}

}  // namespace protoserve::int_groups
