// Weight-only int8 / int4 linear (W8A16, W4A16): bfloat16 activations, integer weights with
// fp32 or fp16 scales per output row and group of input columns (one group spanning every column for
// per-channel scales). Kernel in linear_int.cpp; layouts described there.
#pragma once

#include <cstdint>
#include <string>

namespace protoserve {

// Per (row, group) floats in the panels' order [ceil(N / 16), num_groups, 16], stored as fp32
// or, where every value is exactly an fp16 (GGUF's and GPTQ/AWQ's scales are), as fp16: two
// bytes less per group of streamed weights.
struct GroupValues {
  const void* data;  // nullptr: none (offsets of symmetric weights)
  bool half;
};

// GGUF K-quants' two-level scales (engine/layers/quant/k_quants.py): per (row, group) a
// small integer, per (row, super-block of groups_per_block groups) an fp16 factor, so
//   scale = d * scales,  offset = -(dmin * mins)   (both exact in fp32)
// with `mins` (Q4_K) the values are unsigned (q itself: no 2^(bits-1) bias), without (Q6_K)
// signed as usual. Layouts as GroupValues': [ceil(N / 16), groups (or super-blocks), 16].
struct SuperBlockScales {
  const void* scales;     // int8 (signed_scales) or uint8
  const uint8_t* mins;    // nullptr: no offsets
  const uint16_t* d;      // fp16
  const uint16_t* dmin;   // fp16, with mins
  int64_t groups_per_block;
  bool signed_scales;
};

// An int8 / int4 weight as the fused decode layers hold one per projection (cpu_ops.h's
// DecoderLayerWeights): LinearIntArgs' weight fields. packed == nullptr: the projection is
// linear_bf16's bf16 panels instead.
struct IntWeight {
  const uint8_t* packed = nullptr;
  GroupValues scales{nullptr, false};
  GroupValues offsets{nullptr, false};
  int bits = 0;
  int64_t group_size = 0;
};

struct LinearIntArgs {
  void* output;  // bf16 [num_tokens, out_features]
  int64_t output_stride;
  const void* input;  // bf16 [num_tokens, in_features]
  int64_t input_stride;
  const uint8_t* packed_weight;  // [ceil(N / 16), K / 2 (int8) or K / 4 (int4), 32] bytes
  GroupValues scales;
  // Asymmetric formats (zero points): w = Q * scale + offset per (row, group), same layout as
  // scales; data nullptr for symmetric weights (offset 0).
  GroupValues offsets;
  const void* bias;              // bf16 [out_features] or nullptr
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
  int bits;            // 8 or 4
  int64_t group_size;  // a multiple of 2 (int8) or 4 (int4); in_features per channel
  // K-quant scales instead of `scales` / `offsets` (which are then unused), or nullptr.
  const SuperBlockScales* super = nullptr;
};

void linear_int(const LinearIntArgs& args);  // only with has_avx512_bf16()

// linear_int_prefill.cpp: from 16 rows where AMX runs (`int_prefill_on_tiles`), two panels
// at a time dequantized into a per-thread bf16 scratch and multiplied on AMX tiles; returns
// false (nothing run) elsewhere. linear_int calls it first.
bool linear_int_prefill(const LinearIntArgs& args);
bool int_prefill_on_tiles(int64_t rows);
// linear_int_vnni.cpp: activations quantized to int8 per block of 32 columns and int8 x int8
// dot products (llama.cpp's arithmetic for Q8_0 / Q4_0), where `int8_activations_apply`;
// returns false (nothing run) elsewhere. linear_int calls it first.
bool linear_int_int8_activations(const LinearIntArgs& args);
// Built with AVX512-VNNI and VBMI.
bool int8_activations_compiled();
// Whether linear_int takes int8 activations for this weight shape: compiled, selected, 8 or 4
// bits, in_features and group size multiples of 32.
bool int8_activations_apply(int bits, int64_t in_features, int64_t group_size);
// "int8" or "bf16" (the exact W8A16 kernel) for this process, initially from
// PROTOSERVE_INT_ACTIVATIONS; returns the previous choice, std::invalid_argument otherwise.
std::string set_int_activations(const std::string& name);
// The weight of `args` (input, output and bias unused) into linear_bf16's bf16 panels
// [ceil(N / 16), K / 2, 16, 2] at `out`, rounded as torch's (Q.float() * scale).to(bf16)
// (with offsets: (Q.float() * scale + offset).to(bf16), the product and sum fused).
void dequantize_int_panels(const LinearIntArgs& args, void* out);

}  // namespace protoserve
