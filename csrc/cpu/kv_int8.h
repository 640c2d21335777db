// The int8 KV cache (engine/attention/kv_quant.py): each (token, kv head) row is head_dim
// int8 values, then the float32 scale they were quantized with (value_i = q_i * scale,
// scale = max|x| / 127), so a kernel reads the scale with the row it belongs to:
//
//   row:  [ q_0 ... q_{head_dim-1} | scale (4 bytes) ]      row size = head_dim + 4
//
// quantize_row writes one row as the torch code does (division, round half to even), and
// Int8Decode is decode_kernels.h's kernel interface over such rows, for a float32 or bf16
// query: each K/V row is widened to float32 once and reused by the kv head's G query heads.
#pragma once

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_types.h"
#include "decode_kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace protoserve {

constexpr int64_t kInt8ScaleBytes = 4;

template <typename T>
inline float element_to_float(T value) {
  if constexpr (std::is_same_v<T, float>) return value;
  else return bf16_to_float(value);
}

template <typename T>
void quantize_row(const T* x, int64_t dim, int8_t* row) {
  float amax = 0.0f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(element_to_float(x[d])));
  const float scale = amax / 127.0f;
  for (int64_t d = 0; d < dim; ++d) {
    const float q = scale > 0.0f ? std::nearbyint(element_to_float(x[d]) / scale) : 0.0f;
    row[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
  }
  std::memcpy(row + dim, &scale, sizeof(scale));
}

inline float row_scale(const int8_t* row, int64_t dim) {
  float scale;
  std::memcpy(&scale, row + dim, sizeof(scale));
  return scale;
}

// out[d] = row[d] as float32 (unscaled).
inline void widen_row(const int8_t* row, int64_t dim, float* out) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= dim; d += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d));
    _mm512_storeu_ps(out + d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
  }
#endif
  for (; d < dim; ++d) out[d] = static_cast<float>(row[d]);
}

inline float dot_f32(const float* a, const float* b, int64_t dim) {
  int64_t d = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= dim; d += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; d < dim; ++d) sum += a[d] * b[d];
  return sum;
}

// acc[d] += weight * x[d]
inline void axpy_f32(float weight, const float* x, float* acc, int64_t dim) {
  int64_t d = 0;
#if defined(__AVX512F__)
  const __m512 w = _mm512_set1_ps(weight);
  for (; d + 16 <= dim; d += 16)
    _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(w, _mm512_loadu_ps(x + d),
                                              _mm512_loadu_ps(acc + d)));
#endif
  for (; d < dim; ++d) acc[d] += weight * x[d];
}

// Q: the query's (and output's) element type; the cache rows are int8.
template <typename Q>
struct Int8Decode {
  static void load_query(DecodeState& st, const Q* query, int64_t head_stride) {
    for (int64_t h = 0; h < st.num_heads; ++h)
      for (int64_t d = 0; d < st.head_dim; ++d)
        st.query[h * st.head_dim + d] = element_to_float(query[h * head_stride + d]);
  }

  static void scores(DecodeState& st, int64_t head0, int64_t group, const int8_t* keys,
                     int64_t stride, int64_t n, int64_t offset, float scale,
                     const int8_t* prefetch) {
    prefetch_rows(prefetch, n * (st.head_dim + kInt8ScaleBytes));
    float* key = widened(st);
    for (int64_t t = 0; t < n; ++t) {
      const int8_t* row = keys + t * stride;
      widen_row(row, st.head_dim, key);
      const float row_factor = row_scale(row, st.head_dim) * scale;
      for (int64_t h = head0; h < head0 + group; ++h)
        st.scores[h * st.part_pad + offset + t] =
            dot_f32(st.query.data() + h * st.head_dim, key, st.head_dim) * row_factor;
    }
  }

  static void softmax(DecodeState& st, int64_t n) { PortableDecode<float>::softmax(st, n); }

  static void accumulate(DecodeState& st, int64_t head0, int64_t group, const int8_t* values,
                         int64_t stride, int64_t n, int64_t offset, const int8_t* prefetch) {
    prefetch_rows(prefetch, n * (st.head_dim + kInt8ScaleBytes));
    float* value = widened(st);
    for (int64_t t = 0; t < n; ++t) {
      const int8_t* row = values + t * stride;
      widen_row(row, st.head_dim, value);
      const float row_factor = row_scale(row, st.head_dim);
      for (int64_t h = head0; h < head0 + group; ++h)
        axpy_f32(st.scores[h * st.part_pad + offset + t] * row_factor, value,
                 st.acc.data() + h * st.dim_pad, st.head_dim);
    }
  }

  static void finish(DecodeState& st, float* natural) {
    std::copy(st.acc.begin(), st.acc.end(), natural);
  }

 private:
  // One widened row of scratch per thread (DecodeState's portable query is float already).
  static float* widened(DecodeState& st) {
    thread_local std::vector<float> row;
    if (static_cast<int64_t>(row.size()) < st.head_dim) row.resize(st.head_dim);
    return row.data();
  }

  static void prefetch_rows(const int8_t* region, int64_t bytes) {
    if (region == nullptr) return;
    for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(region + at, 0, 2);
  }
};

}  // namespace protoserve
