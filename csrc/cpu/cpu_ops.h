// The CPU kernels' entry points: raw pointers, element strides and shapes only.
// bindings.cpp validates tensors and fills these structs.
//
// Row views ([tokens, heads, head_dim] with a contiguous last dim) carry two strides so the
// kernels read q/k/v straight out of a fused qkv projection without a copy.
#pragma once

#include <cstdint>

#include "cpu_types.h"

namespace protoserve {

enum class ScalarKind { kFloat32, kBFloat16 };

struct RowsView {
  void* data;
  int64_t token_stride;
  int64_t head_stride;
};

struct CacheShape {
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_kv_heads;
  int64_t head_dim;
};

struct WriteKvArgs {
  ScalarKind kind;
  RowsView key;    // [num_tokens, num_kv_heads, head_dim]
  RowsView value;  // same shape
  int64_t num_tokens;
  void* kv_cache;
  CacheShape cache;
  const int64_t* slot_mapping;  // [num_tokens]; a negative slot marks a padding row
};

struct DecodeArgs {
  ScalarKind kind;
  RowsView out;    // [num_seqs, num_heads, head_dim]
  RowsView query;  // [num_seqs, num_heads, head_dim]
  const void* kv_cache;
  CacheShape cache;
  int64_t num_seqs;
  int64_t num_heads;
  BlockTables block_tables;     // [num_seqs, >= ceil(context_len / block_size)]
  const int64_t* context_lens;  // [num_seqs], each >= 1, including the new token
  float scale;
};

struct PrefillArgs {
  ScalarKind kind;
  RowsView out;    // [num_query_tokens, num_heads, head_dim]
  RowsView query;  // [num_query_tokens, num_heads, head_dim]
  const void* kv_cache;
  CacheShape cache;
  int64_t num_heads;
  BlockTables block_table;  // one row covering [0, context_start + num_query_tokens)
  int64_t context_start;    // query row i sits at position context_start + i
  int64_t num_query_tokens;
  float scale;
};

void write_kv_cache(const WriteKvArgs& args);
void paged_decode_attention(const DecodeArgs& args);
void paged_prefill_attention(const PrefillArgs& args);

// True when this build uses the AVX-512 BF16 kernels for bfloat16 (else portable C++).
bool has_avx512_bf16();

}  // namespace protoserve
