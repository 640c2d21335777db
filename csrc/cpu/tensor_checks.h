// Tensor checks shared by the CPU ops' bindings (bindings.cpp, decode_bindings.cpp): each
// validates what a kernel will read through raw pointers and raises a clear error otherwise.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "cpu_ops.h"

namespace protoserve {

// float32 or bfloat16 (the rows over an int8 cache must be one of these too).
ScalarKind kind_of(const torch::Tensor& t);

// A contiguous CPU [2, num_blocks, block_size, num_kv_heads, head_dim] cache's shape.
CacheShape cache_shape(const torch::Tensor& kv_cache);

// Rows read blocks [first_needed[row] (0 when null), blocks_needed[row]) of their table; every
// block id they read is checked to lie inside the cache.
BlockTables block_tables(const torch::Tensor& tables, int64_t num_blocks, int64_t num_rows,
                         const std::vector<int64_t>& blocks_needed,
                         const std::vector<int64_t>* first_needed = nullptr);

// The step's slot mapping: contiguous 1-D int64, every slot inside the cache (negative: padding).
const int64_t* checked_slots(const torch::Tensor& slot_mapping, const CacheShape& shape);

// Decode context lengths as contiguous int64 [num_seqs] (each >= 1), and the blocks each needs.
torch::Tensor checked_context_lens(const torch::Tensor& context_lens, int64_t num_seqs,
                                   int64_t block_size, std::vector<int64_t>& blocks_needed);

}  // namespace protoserve
