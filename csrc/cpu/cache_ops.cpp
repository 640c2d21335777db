// write_kv_cache: scatter the step's new K/V rows into their flat cache slots.
//
//   slot s  ->  block s / block_size, offset s % block_size
//   key row (t, h)   -> kv_cache[0, block, offset, h, :]
//   value row (t, h) -> kv_cache[1, block, offset, h, :]
//
// Each (token, head) row is one memcpy of head_dim elements; a negative slot is a padding
// row and is skipped. Slots are distinct within a step, so rows never race.
#include <cstring>

#include "cpu_ops.h"
#include "kv_int8.h"

namespace protoserve {
namespace {

// An int8 cache: each (token, head) row quantized into its slot (kv_int8.h).
template <typename T>
void write_int8_rows(const WriteKvArgs& args) {
  const CacheShape& cache = args.cache;
  const int64_t row_size = cache.head_dim;
  const int64_t dim = row_size - kInt8ScaleBytes;
  const int64_t token_stride = cache.num_kv_heads * row_size;
  const int64_t value_offset = cache.num_blocks * cache.block_size * token_stride;
  int8_t* base = static_cast<int8_t*>(args.kv_cache);
  const T* keys = static_cast<const T*>(args.key.data);
  const T* values = static_cast<const T*>(args.value.data);
  const int64_t num_rows = args.num_tokens * cache.num_kv_heads;
  protoserve::work_pool::parallel_for(0, num_rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t token = row / cache.num_kv_heads;
      const int64_t head = row % cache.num_kv_heads;
      const int64_t slot = args.slot_mapping[token];
      if (slot < 0) continue;
      int8_t* dst = base + slot * token_stride + head * row_size;
      quantize_row(keys + token * args.key.token_stride + head * args.key.head_stride, dim, dst);
      quantize_row(values + token * args.value.token_stride + head * args.value.head_stride, dim,
                   dst + value_offset);
    }
  });
}

}  // namespace

void write_kv_cache(const WriteKvArgs& args) {
  if (args.int8_cache) {
    if (args.kind == ScalarKind::kFloat32) write_int8_rows<float>(args);
    else write_int8_rows<bf16_t>(args);
    return;
  }
  const int64_t element_size = args.kind == ScalarKind::kFloat32 ? 4 : 2;
  const CacheShape& cache = args.cache;
  const int64_t row_bytes = cache.head_dim * element_size;
  const int64_t token_stride = cache.num_kv_heads * cache.head_dim;
  const int64_t value_offset = cache.num_blocks * cache.block_size * token_stride;
  char* base = static_cast<char*>(args.kv_cache);
  const int64_t num_rows = args.num_tokens * cache.num_kv_heads;
  // Small steps (decode) are a few hundred short copies: threads would cost more than they save.
  const int64_t grain = 512;
  protoserve::work_pool::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t token = row / cache.num_kv_heads;
      const int64_t head = row % cache.num_kv_heads;
      const int64_t slot = args.slot_mapping[token];
      if (slot < 0) continue;
      const int64_t dst = slot * token_stride + head * cache.head_dim;
      const char* key =
          static_cast<const char*>(args.key.data) +
          (token * args.key.token_stride + head * args.key.head_stride) * element_size;
      const char* value =
          static_cast<const char*>(args.value.data) +
          (token * args.value.token_stride + head * args.value.head_stride) * element_size;
      std::memcpy(base + dst * element_size, key, row_bytes);
      std::memcpy(base + (value_offset + dst) * element_size, value, row_bytes);
    }
  });
}

bool has_avx512_bf16() { return PROTOSERVE_AVX512_BF16 != 0; }

}  // namespace protoserve
