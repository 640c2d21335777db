// Paged decode attention for one work unit: (sequence, context partition), all heads. For
// each block the kernels are called once per kv head, with that kv head's G query heads
// [head0, head0 + G), so each K/V row is read once per kv head, not once per query head, and
// the kv-head loop walks each block's K (then V) rows in memory order.
//
// A partition holds at most `part_len` tokens, so it runs in two passes with exact softmax
// statistics instead of an online rescale per block:
//
//   pass 1, per block:  s[h][t] = scale * q_h . k_t                      (fp32)
//   between passes:     m[h] = max_t s,  p[h][t] = exp(s - m),  l[h] = sum_t p
//   pass 2, per block:  acc[h] += sum_t p[h][t] * v_t                     (fp32)
//
// The partition's result is (m, l, acc); acc / l when it covers the whole context. Kernels
// implement: load_query, scores(block, kv head), softmax, accumulate(block, kv head), finish.
// scores and accumulate also get `prefetch`: null, or n * head_dim contiguous elements that
// decode_attention.cpp will read soon, to be pulled into L2 while this block computes.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_types.h"

namespace protoserve {

// Scratch of one worker thread, reused for every unit it runs.
struct DecodeState {
  int64_t num_heads;  // query heads of the sequence, all processed by one unit
  int64_t head_dim;
  int64_t dim_pad;   // head_dim rounded up to 32 (one bf16 vector)
  int64_t part_pad;  // partition length rounded up to 32
  std::vector<float> m, l;
  std::vector<float> acc;          // [num_heads][dim_pad]; layout is the kernel's own
  std::vector<float> scores;       // [num_heads][part_pad]
  std::vector<float> query;        // [num_heads][head_dim], portable kernel
  std::vector<bf16_t> query_bf16;  // [num_heads][dim_pad] zero padded, vector kernel
  std::vector<bf16_t> probs;       // [num_heads][part_pad], vector kernel
  std::vector<bf16_t> zero_row;    // [dim_pad] zeros: the partner of an odd last token

  DecodeState(int64_t num_heads_, int64_t head_dim_, int64_t part_len)
      : num_heads(num_heads_),
        head_dim(head_dim_),
        dim_pad(round_up(head_dim_, 32)),
        part_pad(round_up(part_len, 32)),
        m(num_heads_),
        l(num_heads_),
        acc(num_heads_ * dim_pad),
        scores(num_heads_ * part_pad),
        query(num_heads_ * head_dim_),
        query_bf16(num_heads_ * dim_pad, 0),
        probs(num_heads_ * part_pad, 0),
        zero_row(dim_pad, 0) {}
};

// Plain C++ for any element type (fp32, or bf16 where AVX512_BF16 is missing); loops over the
// contiguous head dim are left to the compiler's vectoriser.
template <typename T>
struct PortableDecode {
  static void load_query(DecodeState& st, const T* query, int64_t head_stride) {
    for (int64_t h = 0; h < st.num_heads; ++h)
      for (int64_t d = 0; d < st.head_dim; ++d)
        st.query[h * st.head_dim + d] = to_float(query[h * head_stride + d]);
  }

  // Scores of heads [head0, head0 + group) for the n keys of one block of their kv head;
  // `offset` = the block's first token in the partition.
  static void scores(DecodeState& st, int64_t head0, int64_t group, const T* keys,
                     int64_t stride, int64_t n, int64_t offset, float scale, const T* prefetch) {
    prefetch_l2(prefetch, n * st.head_dim);
    for (int64_t h = head0; h < head0 + group; ++h) {
      const float* q = st.query.data() + h * st.head_dim;
      float* s = st.scores.data() + h * st.part_pad + offset;
      for (int64_t t = 0; t < n; ++t) s[t] = dot_product(q, keys + t * stride, st.head_dim) * scale;
    }
  }

  // Turns the partition's n scores into probabilities in place; sets m and l; clears acc.
  static void softmax(DecodeState& st, int64_t n) {
    for (int64_t h = 0; h < st.num_heads; ++h) {
      float* s = st.scores.data() + h * st.part_pad;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
      float l = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - m);
        l += s[t];
      }
      st.m[h] = m;
      st.l[h] = l;
    }
    std::fill(st.acc.begin(), st.acc.end(), 0.0f);
  }

  static void accumulate(DecodeState& st, int64_t head0, int64_t group, const T* values,
                         int64_t stride, int64_t n, int64_t offset, const T* prefetch) {
    prefetch_l2(prefetch, n * st.head_dim);
    for (int64_t h = head0; h < head0 + group; ++h) {
      const float* p = st.scores.data() + h * st.part_pad + offset;
      float* acc = st.acc.data() + h * st.dim_pad;
      for (int64_t t = 0; t < n; ++t) {
        const T* v = values + t * stride;
        for (int64_t d = 0; d < st.head_dim; ++d) acc[d] += p[t] * to_float(v[d]);
      }
    }
  }

  static void prefetch_l2(const T* region, int64_t count) {
    if (region == nullptr) return;
    const char* end = reinterpret_cast<const char*>(region + count);
    for (const char* line = reinterpret_cast<const char*>(region); line < end; line += 64)
      __builtin_prefetch(line, 0, 2);
  }

  // natural[h * dim_pad + d] = acc in natural dim order.
  static void finish(DecodeState& st, float* natural) {
    std::copy(st.acc.begin(), st.acc.end(), natural);
  }
};

}  // namespace protoserve
