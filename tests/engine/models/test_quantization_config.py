"""--quantization and compressed-tensors configs: our packing and rounding equal the
compressed-tensors library's, and every unsupported setting is refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_qparams

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.layers.quant.resolve import resolve_quantization
from engine.layers.quantized_linear import (
    ONLINE_SCHEMES,
    WeightQuant,
    pack_int32,
    quantize_weight,
    unpack_int32,
)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features", [64, 72, 100])
def test_int32_packing_is_the_library_layout(bits: int, in_features: int) -> None:
    limit = 2 ** (bits - 1)
    qweight = torch.randint(-limit, limit, (12, in_features), dtype=torch.int8)
    ours = pack_int32(qweight, bits)
    assert torch.equal(ours, pack_to_int32(qweight, bits))
    assert torch.equal(unpack_int32(ours, bits, in_features), qweight)
    assert torch.equal(
        unpack_from_int32(ours, bits, torch.Size((12, in_features))), qweight)


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, 128), (4, 32)])
def test_round_to_nearest_equals_the_library(bits: int, group: int | None) -> None:
    weight = torch.randn(24, 256) * 0.05
    strategy = "channel" if group is None else "group"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy,
                            group_size=group)
    columns = group or 256
    rows = weight.unflatten(-1, (-1, columns))
    scale, zero_point = calculate_qparams(rows.amin(-1), rows.amax(-1), args)
    expected = quantize(weight, scale, zero_point, args, dtype=torch.int8)
    qweight, our_scale = quantize_weight(weight, bits, columns)
    assert torch.equal(our_scale, scale.reshape(our_scale.shape))
    assert torch.equal(qweight, expected)


def write_config(tmp_path: Path, quantization_config: dict | None, **extra) -> Path:
    raw = {"architectures": ["LlamaForCausalLM"], **extra}
    if quantization_config is not None:
        raw["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def ct_config(**weights_override) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": 128, "dynamic": False, **weights_override}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None,
                                          "format": "pack-quantized"}}}


def test_resolution_table(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    write_config(plain, None)
    assert resolve_quantization("auto", plain, generative=True) is None
    assert resolve_quantization("int8", plain, generative=True) == ONLINE_SCHEMES["int8"]
    assert resolve_quantization("int4", plain, generative=True) == WeightQuant(4, 128, "int4")
    stored = tmp_path / "ct"
    stored.mkdir()
    write_config(stored, ct_config())
    expected = WeightQuant(4, 128, "compressed-tensors")
    assert resolve_quantization("auto", stored, generative=True) == expected
    assert resolve_quantization("compressed-tensors", stored, generative=True) == expected
    write_config(stored, ct_config(num_bits=8, strategy="channel", group_size=None))
    assert resolve_quantization("auto", stored, generative=True) == WeightQuant(
        8, None, "compressed-tensors")
    write_config(stored, ct_config(symmetric=False))
    assert resolve_quantization("auto", stored, generative=True) == WeightQuant(
        4, 128, "compressed-tensors", asymmetric=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["config_groups"]["group_0"]["weights"].update(symmetric="no"),
         r"weights.symmetric must be true or false"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=2),
         r"weights.num_bits must be 4 or 8"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="tensor"),
         r"weights.strategy 'tensor'"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(group_size=7),
         r"weights.group_size must be an even"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(actorder="group"),
         r"weights.actorder 'group'"),
        (lambda c: c["config_groups"]["group_0"].update(
            input_activations={"num_bits": 8}), r"input_activations.strategy must be \"token\""),
        (lambda c: c["config_groups"]["group_0"].update(input_activations={
            "num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
            "dynamic": True}), r"int8 input activations need 8-bit symmetric weights"),
        (lambda c: c["config_groups"]["group_0"].update(output_activations={"num_bits": 8}),
         r"output_activations: output quantization is not supported"),
        (lambda c: c["config_groups"]["group_0"].update(format="float-quantized"),
         r"format 'float-quantized'"),
        (lambda c: c.update(quant_method="bitsandbytes"), r"quant_method 'bitsandbytes'"),
        (lambda c: c.update(ignore=["re:.*down_proj"]), r"ignore entry 're:.\*down_proj'"),
        (lambda c: c["config_groups"].update(group_1=c["config_groups"]["group_0"]),
         r"config_groups: exactly one group"),
    ],
)
def test_unsupported_checkpoint_settings_are_named(tmp_path: Path, change, message) -> None:
    config = ct_config()
    change(config)
    write_config(tmp_path, config)
    with pytest.raises(ModelLoadError, match=message):
        resolve_quantization("auto", tmp_path, generative=True)


def test_bad_flag_values_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--quantization\) must be one of"):
        ModelConfig(model="m", quantization="int3")
    with pytest.raises(ModelLoadError, match="--quantization must be one of"):
        resolve_quantization("fp8", write_config(tmp_path, None), generative=True)
    # Encoders are quantized online too (layers/quant/encoder.py).
    assert resolve_quantization("int8", tmp_path, generative=False).method == "int8"
    write_config(tmp_path, ct_config(), num_local_experts=4)
    with pytest.raises(ModelLoadError, match="mixture-of-experts"):
        resolve_quantization("auto", tmp_path, generative=True)


def test_cli_flag_reaches_the_model_config() -> None:
    from protoserve.cli.serve import build_parser  # noqa: PLC0415 - the CLI's own parser

    args = build_parser().parse_args(["--model", "m", "--quantization", "int4"])
    assert args.quantization == "int4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--quantization", "int3"])


def gptq_config(**override) -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
            "sym": False, "checkpoint_format": "gptq", "lm_head": False, **override}


def test_gptq_and_awq_resolution(tmp_path: Path) -> None:
    write_config(tmp_path, gptq_config())
    assert resolve_quantization("auto", tmp_path, generative=True) == WeightQuant(
        4, 128, "gptq", asymmetric=True, zero_plus_one=True)
    write_config(tmp_path, gptq_config(sym=True, group_size=-1, checkpoint_format="gptq_v2"))
    assert resolve_quantization("gptq", tmp_path, generative=True) == WeightQuant(
        4, None, "gptq")
    write_config(tmp_path, {"quant_method": "awq", "bits": 4, "group_size": 128,
                            "zero_point": True, "version": "gemm"})
    assert resolve_quantization("awq", tmp_path, generative=True) == WeightQuant(
        4, 128, "awq", asymmetric=True)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (gptq_config(bits=3), r"bits must be 4 or 8 for gptq, got 3"),
        (gptq_config(group_size=7), r"group_size must be -1 or a multiple of 4"),
        (gptq_config(lm_head=True), r"lm_head: a quantized lm_head"),
        (gptq_config(checkpoint_format="marlin"), r"checkpoint_format 'marlin'"),
        (gptq_config(dynamic={"-:.*down": {}}), r"dynamic: per-module overrides"),
        ({"quant_method": "awq", "bits": 8, "group_size": 128}, r"bits must be 4 for awq"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False},
         r"zero_point: only AWQ's zero-point scheme"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128,
          "modules_to_not_convert": ["down_proj"]}, r"modules_to_not_convert entry 'down_proj'"),
    ],
)
def test_unsupported_gptq_awq_settings_are_named(tmp_path: Path, config, message) -> None:
    write_config(tmp_path, config)
    with pytest.raises(ModelLoadError, match=message):
        resolve_quantization("auto", tmp_path, generative=True)
