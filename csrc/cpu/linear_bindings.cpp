// Tensor checks of the dense linear ops (bf16 panels, int8/int4 panels), then raw pointers
// into linear_bf16.cpp / linear_int.cpp. Kept out of bindings.cpp, as the MoE op is.
#include "linear_bindings.h"

#include "cpu_ops.h"
#include "linear_int.h"
#include "linear_w8a8.h"
#include "step_timers.h"

namespace protoserve {
namespace {

// input [tokens, in_features] and out [tokens, out_features] (both with a contiguous last
// dim), out_features covered by `num_panels` panels of 16 rows; returns (tokens, out_features).
std::pair<int64_t, int64_t> check_rows_and_panels(const torch::Tensor& out,
                                                  const torch::Tensor& input,
                                                  int64_t in_features, int64_t num_panels) {
  TORCH_CHECK(input.dim() == 2 && input.size(1) == in_features && input.stride(1) == 1,
              "input must be [tokens, ", in_features, "] with a contiguous last dim");
  const int64_t num_tokens = input.size(0), out_features = out.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == num_tokens && out.stride(1) == 1,
              "out must be [tokens, out_features] with a contiguous last dim");
  TORCH_CHECK(out_features <= num_panels * 16 && out_features > (num_panels - 1) * 16,
              "out_features ", out_features, " does not match ", num_panels, " panels");
  return {num_tokens, out_features};
}

const void* checked_bias(const std::optional<torch::Tensor>& bias, int64_t out_features) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == torch::kBFloat16 && bias->is_contiguous() &&
                  bias->numel() == out_features,
              "bias must be a contiguous bfloat16 [out_features]");
  return bias->data_ptr();
}

}  // namespace

void linear_bf16_op(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& packed,
                    const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(has_avx512_bf16(), "linear_bf16 needs AVX512_BF16");
  for (const torch::Tensor* t : {static_cast<const torch::Tensor*>(&out), &input, &packed})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16,
                "linear_bf16 takes bfloat16 CPU tensors");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2 &&
                  packed.is_contiguous(),
              "packed weight must be contiguous [ceil(N / 16), K / 2, 16, 2]");
  const int64_t in_features = packed.size(1) * 2;
  const auto [num_tokens, out_features] =
      check_rows_and_panels(out, input, in_features, packed.size(0));
  const void* bias_ptr = checked_bias(bias, out_features);
  LinearArgs args{out.data_ptr(),  out.stride(0),     input.data_ptr(),
                  input.stride(0), packed.data_ptr(), bias_ptr,
                  num_tokens,      in_features,       out_features};
  pybind11::gil_scoped_release no_gil;
  const StepTimer timer(StepRegion::kLinear);
  linear_bf16(args);
}

CheckedIntWeight check_int_weight(const torch::Tensor& packed, const torch::Tensor& scales,
                                  const std::optional<torch::Tensor>& offsets, int64_t bits,
                                  int64_t group_size, const SuperBlockScales* super) {
  // 6 bits: Q6_K's layout (linear_int.cpp), K-quant scales without mins only.
  TORCH_CHECK(bits == 8 || bits == 4 || (bits == 6 && super != nullptr && super->mins == nullptr),
              "linear_int: bits must be 8 or 4 (6 for Q6_K), got ", bits);
  // int8: one pair of columns per 32 bytes; int4: two; 6-bit: two per 48 bytes.
  const int64_t columns_per_vector = bits == 8 ? 2 : 4;
  const int64_t step_bytes = bits == 6 ? 48 : 32;
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == torch::kUInt8 &&
                  packed.dim() == 3 && packed.size(2) == step_bytes && packed.is_contiguous(),
              "packed weight must be contiguous uint8 [ceil(N / 16), K / ", columns_per_vector,
              ", ", step_bytes, "]");
  const int64_t num_panels = packed.size(0), in_features = packed.size(1) * columns_per_vector;
  TORCH_CHECK(group_size > 0 && group_size % columns_per_vector == 0, "group_size must be a "
              "multiple of ", columns_per_vector, " for int", bits, ", got ", group_size);
  const int64_t num_groups = (in_features + group_size - 1) / group_size;
  const auto is_group_float = [](const torch::Tensor& t) {
    return t.device().is_cpu() && t.is_contiguous() &&
           (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kFloat16);
  };
  // K-quant scales (`super`) were checked by linear_int_k_quant_op; `scales` is unused then.
  TORCH_CHECK(super != nullptr ||
                  (is_group_float(scales) && scales.dim() == 3 && scales.size(0) == num_panels &&
                   scales.size(1) == num_groups && scales.size(2) == 16),
              "scales must be contiguous float32 or float16 [", num_panels, ", ", num_groups,
              ", 16]");
  GroupValues offset_values{nullptr, false};
  if (offsets.has_value()) {
    TORCH_CHECK(is_group_float(*offsets) && offsets->sizes() == scales.sizes(),
                "offsets must be contiguous float32 or float16 shaped like scales");
    offset_values = {offsets->data_ptr(), offsets->scalar_type() == torch::kFloat16};
  }
  const GroupValues scale_values{scales.data_ptr(), scales.scalar_type() == torch::kFloat16};
  return {{packed.data_ptr<uint8_t>(), scale_values, offset_values, static_cast<int>(bits),
           group_size},
          in_features, num_panels};
}

namespace {

// linear_int_op's checks and call; `super`: K-quant scales (`scales` then unread).
void run_linear_int(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& packed,
                    const torch::Tensor& scales, const std::optional<torch::Tensor>& bias,
                    int64_t bits, int64_t group_size,
                    const std::optional<torch::Tensor>& dequantize_into,
                    const std::optional<torch::Tensor>& offsets, const SuperBlockScales* super) {
  TORCH_CHECK(has_avx512_bf16(), "linear_int needs AVX512_BF16");
  for (const torch::Tensor* t : {static_cast<const torch::Tensor*>(&out), &input})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16,
                "linear_int takes bfloat16 CPU activations");
  const auto [weight, in_features, num_panels] =
      check_int_weight(packed, scales, offsets, bits, group_size, super);
  const auto [num_tokens, out_features] =
      check_rows_and_panels(out, input, in_features, num_panels);
  const void* bias_ptr = checked_bias(bias, out_features);
  LinearIntArgs args{out.data_ptr(),   out.stride(0),
                     input.data_ptr(), input.stride(0),
                     weight.packed,    weight.scales,
                     weight.offsets,   bias_ptr,
                     num_tokens,
                     in_features,      out_features,
                     weight.bits,      group_size,
                     super};
  if (dequantize_into.has_value()) {
    TORCH_CHECK(dequantize_into->scalar_type() == torch::kBFloat16 &&
                    dequantize_into->is_contiguous() &&
                    dequantize_into->numel() == num_panels * 16 * in_features,
                "dequantize_into must be contiguous bfloat16 [", num_panels, ", ",
                in_features / 2, ", 16, 2]");
    pybind11::gil_scoped_release no_gil;
    dequantize_int_panels(args, dequantize_into->data_ptr());
    return;
  }
  pybind11::gil_scoped_release no_gil;
  linear_int(args);
}

}  // namespace

void linear_int_op(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& packed,
                   const torch::Tensor& scales, const std::optional<torch::Tensor>& bias,
                   int64_t bits, int64_t group_size,
                   const std::optional<torch::Tensor>& dequantize_into,
                   const std::optional<torch::Tensor>& offsets) {
  run_linear_int(out, input, packed, scales, bias, bits, group_size, dequantize_into, offsets,
                 nullptr);
}

void linear_int_k_quant_op(torch::Tensor& out, const torch::Tensor& input,
                           const torch::Tensor& packed, int64_t bits, int64_t group_size,
                           const torch::Tensor& scales, const std::optional<torch::Tensor>& mins,
                           const torch::Tensor& d, const std::optional<torch::Tensor>& dmin,
                           int64_t groups_per_block, const std::optional<torch::Tensor>& bias,
                           const std::optional<torch::Tensor>& dequantize_into) {
  TORCH_CHECK(bits == 8 || bits == 6 || bits == 4,
              "linear_int_k_quant: bits must be 8, 6 or 4, got ", bits);
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kUInt8,
              "packed weight must be uint8 [panels, steps, 32 or 48]");
  const int64_t num_panels = packed.size(0);
  const int64_t in_features = packed.size(1) * (bits == 8 ? 2 : 4);
  TORCH_CHECK(group_size > 0 && in_features % group_size == 0 && groups_per_block > 0,
              "group_size must divide in_features");
  const int64_t num_groups = in_features / group_size;
  const int64_t num_blocks = (num_groups + groups_per_block - 1) / groups_per_block;
  const auto check = [&](const torch::Tensor& t, int64_t columns, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 3 &&
                    t.size(0) == num_panels && t.size(1) == columns && t.size(2) == 16,
                name, " must be contiguous [", num_panels, ", ", columns, ", 16]");
  };
  check(scales, num_groups, "scales");
  TORCH_CHECK(scales.scalar_type() == torch::kInt8 || scales.scalar_type() == torch::kUInt8,
              "scales must be int8 or uint8");
  check(d, num_blocks, "d");
  TORCH_CHECK(d.scalar_type() == torch::kFloat16, "d must be float16");
  TORCH_CHECK(mins.has_value() == dmin.has_value(), "mins and dmin come together");
  if (mins.has_value()) {
    check(*mins, num_groups, "mins");
    check(*dmin, num_blocks, "dmin");
    TORCH_CHECK(mins->scalar_type() == torch::kUInt8 && dmin->scalar_type() == torch::kFloat16,
                "mins must be uint8 and dmin float16");
  }
  const SuperBlockScales super{
      scales.data_ptr(),
      mins.has_value() ? mins->data_ptr<uint8_t>() : nullptr,
      reinterpret_cast<const uint16_t*>(d.data_ptr()),
      dmin.has_value() ? reinterpret_cast<const uint16_t*>(dmin->data_ptr()) : nullptr,
      groups_per_block, scales.scalar_type() == torch::kInt8};
  run_linear_int(out, input, packed, scales, bias, bits, group_size, dequantize_into,
                 std::nullopt, &super);
}

void linear_w8a8_op(torch::Tensor& out, const torch::Tensor& input, const torch::Tensor& packed,
                    const torch::Tensor& weight_scales, const std::optional<torch::Tensor>& bias) {
  for (const torch::Tensor* t : {static_cast<const torch::Tensor*>(&out), &input})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16,
                "linear_w8a8 takes bfloat16 CPU activations");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == torch::kUInt8 &&
                  packed.dim() == 3 && packed.size(1) % 16 == 0 && packed.size(2) == 64 &&
                  packed.is_contiguous(),
              "packed weight must be contiguous uint8 [ceil(N / 16), K_pad / 4, 64], K_pad a "
              "multiple of 64");
  const int64_t num_panels = packed.size(0), padded_in = packed.size(1) * 4;
  const int64_t in_features = input.size(1);
  TORCH_CHECK(in_features <= padded_in && in_features > padded_in - 64,
              "input has ", in_features, " features; the packed weight takes ", padded_in);
  TORCH_CHECK(weight_scales.device().is_cpu() && weight_scales.scalar_type() == torch::kFloat32 &&
                  weight_scales.is_contiguous() && weight_scales.numel() == num_panels * 16,
              "weight_scales must be contiguous float32 [", num_panels * 16, "]");
  const auto [num_tokens, out_features] =
      check_rows_and_panels(out, input, in_features, num_panels);
  const void* bias_ptr = checked_bias(bias, out_features);
  LinearW8A8Args args{out.data_ptr(),   out.stride(0),
                      input.data_ptr(), input.stride(0),
                      packed.data_ptr<uint8_t>(), weight_scales.data_ptr<float>(),
                      bias_ptr,         num_tokens,
                      in_features,      padded_in,
                      out_features};
  pybind11::gil_scoped_release no_gil;
  linear_w8a8(args);
}

void register_quantized_linear_ops(pybind11::module& m) {
  m.def("linear_int_k_quant", &protoserve::linear_int_k_quant_op,
        "linear_int over GGUF K-quant blocks (Q4_K, Q6_K): two-level integer scales");
  m.def("linear_w8a8", &protoserve::linear_w8a8_op,
        "W8A8: x quantized per token to int8, . Q^T in int32, scaled (+ bias), bfloat16 out");
  m.def("set_int_activations", &protoserve::set_int_activations,
        "linear_int's activations: int8 (per block of 32) or bf16 (exact); returns the previous");
  m.def("int8_activations_apply", &protoserve::int8_activations_apply,
        "Whether linear_int quantizes the activations to int8 for (bits, in_features, group)");
  m.def("int_prefill_on_tiles", &protoserve::int_prefill_on_tiles,
        "Whether linear_int runs a call of this many rows on AMX tiles over dequantized panels");
  m.def("set_w8a8_kernel", &protoserve::set_w8a8_kernel,
        "Pin linear_w8a8's kernel: auto, vnni, amx or scalar; returns the previous choice");
  m.def("has_avx512_vnni", &protoserve::has_avx512_vnni,
        "Whether linear_w8a8 was built with its AVX512-VNNI kernel");
  m.def("has_amx_int8", &protoserve::has_amx_int8,
        "Whether linear_w8a8 can use AMX-INT8 tiles here (CPU and OS permission)");
}

}  // namespace protoserve
