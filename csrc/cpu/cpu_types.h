// Plain data shared by the CPU kernels: bf16 scalar conversions, the paged-cache view, block
// tables of either index width, and a dynamic work loop on top of the work pool
// (work_pool.h).
//
// Kernel files see raw pointers and these structs only; tensors and their checks stay in
// bindings.cpp, so the kernels compile quickly and do not depend on the tensor API.
#pragma once

#include <ATen/Parallel.h>

#include "work_pool.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512BF16__)
#define PROTOSERVE_AVX512_BF16 1
#include <immintrin.h>
#else
#define PROTOSERVE_AVX512_BF16 0
#endif

namespace protoserve {

// bfloat16 is carried as its raw 16 bits; float32 is the upper half of its bit pattern.
using bf16_t = uint16_t;

inline float bf16_to_float(bf16_t value) {
  uint32_t bits = static_cast<uint32_t>(value) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Round to nearest even, as torch does; NaN stays a (quiet) NaN.
inline bf16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16_t>(bits >> 16);
}

template <typename T>
inline float to_float(T value);
template <>
inline float to_float<float>(float value) { return value; }
template <>
inline float to_float<bf16_t>(bf16_t value) { return bf16_to_float(value); }

template <typename T>
inline T from_float(float value);
template <>
inline float from_float<float>(float value) { return value; }
template <>
inline bf16_t from_float<bf16_t>(float value) { return float_to_bf16(value); }

// One layer's cache: kv[2, num_blocks, block_size, num_kv_heads, head_dim], contiguous.
//
//   element (kv, block, slot, head, d) lives at
//     kv * num_blocks * block_stride + block * block_stride + slot * token_stride + head * D + d
//   with token_stride = num_kv_heads * D and block_stride = block_size * token_stride.
template <typename T>
struct PagedCache {
  const T* data;
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_kv_heads;
  int64_t head_dim;

  int64_t token_stride() const { return num_kv_heads * head_dim; }
  int64_t block_stride() const { return block_size * token_stride(); }
  const T* key_row(int64_t block, int64_t slot, int64_t head) const {
    return data + block * block_stride() + slot * token_stride() + head * head_dim;
  }
  const T* value_row(int64_t block, int64_t slot, int64_t head) const {
    return key_row(block, slot, head) + num_blocks * block_stride();
  }
};

// Block tables arrive as int32 or int64; one branch per block read is cheaper than a copy.
struct BlockTables {
  const void* data;
  int64_t row_stride;  // elements between consecutive sequences' rows
  bool is_int32;

  int64_t at(int64_t row, int64_t index) const {
    const int64_t offset = row * row_stride + index;
    return is_int32 ? static_cast<const int32_t*>(data)[offset]
                    : static_cast<const int64_t*>(data)[offset];
  }
};

// Runs `body(unit, worker)` for every unit in [0, num_units) on torch's intra-op threads.
// Units are handed out one at a time from a shared counter, so uneven units (ragged contexts,
// causal tiles) still keep every thread busy. `make_worker()` builds per-thread scratch once.
template <typename MakeWorker, typename Body>
void for_each_unit(int64_t num_units, MakeWorker make_worker, Body body) {
  if (num_units <= 0) return;
  const int64_t num_threads = std::min<int64_t>(at::get_num_threads(), num_units);
  std::atomic<int64_t> next{0};
  protoserve::work_pool::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    auto worker = make_worker();
    for (int64_t unit = next.fetch_add(1); unit < num_units; unit = next.fetch_add(1)) {
      body(unit, worker);
    }
  });
}

// q . k in fp32. The simd reduction lets the compiler vectorise the sum (a plain loop must
// keep the serial summation order, which blocks vectorisation without -ffast-math).
template <typename T>
inline float dot_product(const float* q, const T* k, int64_t n) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < n; ++d) dot += q[d] * to_float(k[d]);
  return dot;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace protoserve
