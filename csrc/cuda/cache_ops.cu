// write_kv_cache on CUDA: one thread block per token; its threads copy the token's
// num_kv_heads * head_dim key and value elements into slot_mapping[token]:
//
//   element (h, d) of token t  ->  kv[0 or 1, slot / block_size, slot % block_size, h, d]
//
// The copy is dtype-agnostic, so the kernel is instantiated per element size only.
#include <cstdint>

#include "paged_ops.h"

namespace protoserve::cuda {
namespace {

template <typename Element>
__global__ void write_kv_cache_kernel(WriteKvParams params) {
  const int64_t token = blockIdx.x;
  const int64_t slot = params.slot_mapping[token];
  if (slot < 0) return;  // padding row
  const CacheView& cache = params.cache;
  const int64_t row_elements = cache.num_kv_heads * cache.head_dim;
  const int64_t value_offset = cache.num_blocks * cache.block_size * row_elements;
  Element* dst = static_cast<Element*>(cache.data) + slot * row_elements;
  const Element* key =
      static_cast<const Element*>(params.key.data) + token * params.key.token_stride;
  const Element* value =
      static_cast<const Element*>(params.value.data) + token * params.value.token_stride;
  for (int64_t i = threadIdx.x; i < row_elements; i += blockDim.x) {
    const int64_t head = i / cache.head_dim;
    const int64_t d = i % cache.head_dim;
    dst[i] = key[head * params.key.head_stride + d];
    dst[value_offset + i] = value[head * params.value.head_stride + d];
  }
}

}  // namespace

cudaError_t launch_write_kv_cache(const WriteKvParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(params.num_tokens));
  const dim3 block(128);
  if (params.dtype == DType::kFloat32)
    write_kv_cache_kernel<uint32_t><<<grid, block, 0, stream>>>(params);
  else
    write_kv_cache_kernel<uint16_t><<<grid, block, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace protoserve::cuda
