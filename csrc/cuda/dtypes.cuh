// Element conversions for the CUDA kernels. torch builds with the half/bf16 operators and
// implicit conversions disabled (-D__CUDA_NO_HALF_OPERATORS__ etc.), so every conversion is
// an explicit intrinsic call; all arithmetic happens in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace protoserve::cuda {

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

}  // namespace protoserve::cuda
