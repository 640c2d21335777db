// Tensor checks shared by the CPU ops' bindings (tensor_checks.h says what each checks).
#include "tensor_checks.h"

namespace protoserve {

ScalarKind kind_of(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kFloat32) return ScalarKind::kFloat32;
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16,
              "kv_cache (or, over an int8 cache, q/k/v) must be float32 or bfloat16, got ",
              t.scalar_type());
  return ScalarKind::kBFloat16;
}

CacheShape cache_shape(const torch::Tensor& kv_cache) {
  TORCH_CHECK(kv_cache.device().is_cpu(), "kv_cache must be a CPU tensor");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  return {kv_cache.size(1), kv_cache.size(2), kv_cache.size(3), kv_cache.size(4)};
}

// Rows read blocks [first_needed[row] (0 when null), blocks_needed[row]) of their table.
BlockTables block_tables(const torch::Tensor& tables, int64_t num_blocks, int64_t num_rows,
                         const std::vector<int64_t>& blocks_needed,
                         const std::vector<int64_t>* first_needed) {
  TORCH_CHECK(tables.device().is_cpu(), "block tables must be a CPU tensor");
  TORCH_CHECK(tables.scalar_type() == torch::kInt32 || tables.scalar_type() == torch::kInt64,
              "block tables must be int32 or int64");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == num_rows && tables.stride(1) == 1,
              "block tables must be [", num_rows, ", max_blocks] with a contiguous last dim");
  BlockTables view{tables.data_ptr(), tables.stride(0), tables.scalar_type() == torch::kInt32};
  // Out-of-range ids would read outside the cache: check every block the kernels will touch.
  for (int64_t row = 0; row < num_rows; ++row) {
    TORCH_CHECK(blocks_needed[row] <= tables.size(1), "context of row ", row, " needs ",
                blocks_needed[row], " blocks; its table has ", tables.size(1));
    for (int64_t i = first_needed ? (*first_needed)[row] : 0; i < blocks_needed[row]; ++i) {
      const int64_t block = view.at(row, i);
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id ", block, " out of range");
    }
  }
  return view;
}

// The step's slot mapping: contiguous 1-D int64, every slot inside the cache (negative: padding).
const int64_t* checked_slots(const torch::Tensor& slot_mapping, const CacheShape& shape) {
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == torch::kInt64 &&
                  slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous 1-D int64 CPU tensor");
  const int64_t num_slots = shape.num_blocks * shape.block_size;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.size(0); ++t)
    TORCH_CHECK(slots[t] < num_slots, "slot ", slots[t], " out of range (", num_slots, " slots)");
  return slots;
}

// Decode context lengths as contiguous int64 [num_seqs] (each >= 1), and the blocks each needs.
torch::Tensor checked_context_lens(const torch::Tensor& context_lens, int64_t num_seqs,
                                   int64_t block_size, std::vector<int64_t>& blocks_needed) {
  torch::Tensor lens = context_lens.to(torch::kCPU, torch::kInt64).contiguous();
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == num_seqs, "context_lens must be [num_seqs]");
  blocks_needed.resize(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = lens.data_ptr<int64_t>()[s];
    TORCH_CHECK(len >= 1, "context lengths must be >= 1");
    blocks_needed[s] = (len + block_size - 1) / block_size;
  }
  return lens;
}

}  // namespace protoserve
