// W8A8 linear (compressed-tensors' int8 weights with dynamic per-token int8 activations):
// activations quantized per token on the fly, int8 x int8 products summed in int32, scaled by
// the token's and the row's scales once. Kernel and layout in linear_w8a8.cpp.
#pragma once

#include <cstdint>
#include <string>

namespace protoserve {

struct LinearW8A8Args {
  void* output;  // bf16 [num_tokens, out_features]
  int64_t output_stride;
  const void* input;  // bf16 [num_tokens, in_features]
  int64_t input_stride;
  // [ceil(N / 16), padded_in_features / 4, 64] bytes: byte 4 r + j of step s is
  // Q[16 p + r, 4 s + j] + 128; columns past in_features hold 128 (Q = 0).
  const uint8_t* packed_weight;
  const float* weight_scales;  // [ceil(N / 16) * 16], per output row
  const void* bias;            // bf16 [out_features] or nullptr
  int64_t num_tokens;
  int64_t in_features;
  int64_t padded_in_features;  // in_features rounded up to a multiple of 64
  int64_t out_features;
};

// Runs on any CPU: AMX-INT8 tiles, AVX512-VNNI or portable C++ (set_w8a8_kernel). Every kernel
// gives bit-identical outputs (integer sums are exact; the epilogue's float ops are the same).
void linear_w8a8(const LinearW8A8Args& args);
// "auto" (AMX from kW8A8AmxMinTokens tokens where has_amx_int8(), else VNNI where compiled
// in, else scalar), "vnni", "amx" or "scalar"; returns the previous choice, throws
// std::invalid_argument for a name this build or CPU cannot run.
std::string set_w8a8_kernel(const std::string& name);
bool has_avx512_vnni();  // compiled with AVX512-VNNI
bool has_amx_int8();     // AMX-INT8 on this CPU, tile state granted by the OS

}  // namespace protoserve
