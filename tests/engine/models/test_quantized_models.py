"""Weight-only quantization of whole models (--quantization int8 / int4 and compressed-tensors
checkpoints) against transformers running the same dequantized weights.

float32: our forward (dequantize-then-matmul in torch) equals transformers' to 1e-4 and greedy
decoding picks the same tokens. bfloat16 on our CPU kernels: no further from the float32
reference than transformers' own bf16 model of the same weights is.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_factory import build_tiny_model
from quant_checkpoints import (
    HF_LINEARS,
    assert_no_further_than_bf16,
    greedy_against_reference,
    hf_with_weights,
    library_dequantized_model,
    online_reference_weights,
    quantize_linear_inputs,
    reference_logits,
    write_compressed_tensors,
)
from transformers import AutoModelForCausalLM

from engine.attention import resolve_attention_backend
from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.layers.quantized_linear import LM_HEAD_QUANT, ONLINE_SCHEMES, QuantizedLinear
from engine.models.loader import load_model

# in_features 160 and 320: int4's groups of 128 end in a partial group.
SHAPE = dict(hidden_size=160, num_heads=4, num_kv_heads=2, intermediate_size=320,
             initializer_range=0.15)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("quant") / "base", **SHAPE)


def prompt() -> list[int]:
    return torch.randint(3, 400, (11,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_online_float32_equals_transformers_on_dequantized_weights(base_dir, method) -> None:
    loaded = load_model(ModelConfig(model=str(base_dir), dtype="float32", quantization=method))
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    # 4 projections x 2 layers and the (untied) LM head, int8 per channel.
    assert len(layers) == 4 * 2 + 1 and all(layer.packing == "dequantize" for layer in layers)
    assert isinstance(loaded.model.lm_head, QuantizedLinear)
    assert loaded.model.lm_head.quant == LM_HEAD_QUANT
    hf = hf_with_weights(base_dir, online_reference_weights(base_dir, method, torch.float32))
    ours, theirs = greedy_against_reference(loaded, hf, prompt(), steps=6)
    for actual, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        assert int(actual[-1].argmax()) == int(expected[-1].argmax())
    # Quantization really happened: the unquantized model gives other logits.
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assert (reference_logits(plain, prompt()) - theirs[0]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_online_bfloat16_kernels_track_float32(base_dir, method) -> None:
    loaded = load_model(
        ModelConfig(model=str(base_dir), dtype="bfloat16", quantization=method),
        attention_backend=resolve_attention_backend("auto", torch.device("cpu"), 4),
    )
    reference_weights = online_reference_weights(base_dir, method, torch.bfloat16)
    hf = hf_with_weights(base_dir, reference_weights)
    hf_bf16 = hf_with_weights(base_dir, reference_weights).to(torch.bfloat16)
    # Where the kernels quantize activations to int8, both references round the inputs of
    # the same projections (and of the int8 LM head) the same way.
    quant = ONLINE_SCHEMES[method]
    groups = {name: (quant.bits, quant.group_size) for name in HF_LINEARS}
    groups["lm_head"] = (LM_HEAD_QUANT.bits, LM_HEAD_QUANT.group_size)
    for reference in (hf, hf_bf16):
        quantize_linear_inputs(reference, groups)
    assert_no_further_than_bf16(loaded, hf, hf_bf16, prompt())


@pytest.mark.parametrize(
    ("preset", "strategy", "group_size", "symmetric"),
    [("W8A16", "channel", None, True), ("W4A16", "group", 32, True),
     ("W4A16", "channel", None, True), ("W8A16", "group", 160, True),
     ("W4A16", "group", 32, False), ("W8A16", "channel", None, False)],
)
def test_compressed_tensors_checkpoint_matches_library_decompression(
    base_dir, tmp_path, preset, strategy, group_size, symmetric
) -> None:
    ct_dir = write_compressed_tensors(base_dir, tmp_path / "ct", preset=preset,
                                      strategy=strategy, group_size=group_size,
                                      symmetric=symmetric)
    loaded = load_model(ModelConfig(model=str(ct_dir), dtype="float32"))
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 8 and all(layer.quant.bits == int(preset[1]) for layer in layers)
    assert all(layer.quant.asymmetric == (not symmetric) for layer in layers)
    hf = library_dequantized_model(base_dir, ct_dir)
    ours, theirs = greedy_against_reference(loaded, hf, prompt(), steps=5)
    for actual, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        assert int(actual[-1].argmax()) == int(expected[-1].argmax())
    # The same file on the bf16 kernels stays close to that reference.
    kernels = load_model(ModelConfig(model=str(ct_dir), dtype="bfloat16"))
    bf16_ours, bf16_theirs = greedy_against_reference(kernels, hf, prompt(), steps=0)
    error = (bf16_ours[0] - bf16_theirs[0]).norm() / bf16_theirs[0].norm()
    assert float(error) < 0.05


def test_online_quantization_of_a_quantized_checkpoint_names_the_flag(base_dir, tmp_path) -> None:
    ct_dir = write_compressed_tensors(base_dir, tmp_path / "ct", preset="W8A16",
                                      strategy="channel", group_size=None)
    with pytest.raises(ModelLoadError, match="--quantization int4: .* already quantized"):
        load_model(ModelConfig(model=str(ct_dir), quantization="int4"))
    with pytest.raises(ModelLoadError, match="--quantization compressed-tensors: .* no "
                                             "quantization_config"):
        load_model(ModelConfig(model=str(base_dir), quantization="compressed-tensors"))


def test_int8_keeps_the_trained_fixture_perplexity() -> None:
    """On a real trained model (../shared/fixtures/stories260k, skipped without it), int8's
    perplexity on the model's own samples stays within 10% of float32's."""
    from benchmarks.quantized_perplexity import FIXTURE, mean_nll, sample_sequences

    if not (FIXTURE / "config.json").is_file():
        pytest.skip("the stories260k fixture is not here")
    sequences = sample_sequences(FIXTURE, count=4, length=64, seed=0)
    nll = {}
    for quantization in ("auto", "int8"):
        loaded = load_model(ModelConfig(model=str(FIXTURE), dtype="float32",
                                        quantization=quantization))
        nll[quantization] = sum(mean_nll(loaded, ids) for ids in sequences) / len(sequences)
    assert nll["int8"] - nll["auto"] < 0.095  # ln(1.1)
