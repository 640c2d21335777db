"""Int8 / int4 projections on the one-call decode path (engine/models/fused_decode.py): the
native layers call linear_int where QuantizedLinear's forward would, so a decode step's logits
are bit-identical to the per-op path's, in both activation modes (int8 per block of 32, the
exact bf16 kernel), for online quantization, GPTQ, AWQ and GGUF Q8_0 / Q4_0 files; formats
the native layers do not take (act-order GPTQ, K-quants) keep the per-op path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fused_decode_runs import fused_decode_runs
from gguf_checkpoints import write_gguf
from gptq_awq_checkpoints import write_awq, write_gptq
from model_factory import build_tiny_model

from engine import linear_kernel, ops
from engine.attention import resolve_attention_backend
from engine.config import ModelConfig
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.layers.quantized_linear import QuantizedLinear
from engine.models.loader import LoadedModel, load_model
from engine.runner.input_prep import prepare_inputs
from engine.runner.kv_memory import KVCacheSpec, allocate_kv_caches
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    not ops.decode_layers_available(), reason="needs the native ops with AVX512_BF16"
)

# in_features 256 and 384: whole groups of 32 and 128 (int8 activations apply everywhere).
SHAPE = dict(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=384,
             initializer_range=0.15, num_layers=2)
BLOCK_SIZE = 4
PROMPTS = [[3 + (7 * i + j) % 300 for j in range(n)] for i, n in enumerate((5, 12, 9))]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-fused")
    built = {arch: build_tiny_model(root / arch, arch=arch, **SHAPE)
             for arch in ("llama", "qwen3")}
    # K-quants take whole super-blocks of 256 columns.
    built["llama-512"] = build_tiny_model(root / "llama-512", **{**SHAPE,
                                                                "intermediate_size": 512})
    return built


def _checkpoint(case: str, bases: dict[str, Path], tmp_path: Path) -> tuple[str, str]:
    """(model path, --quantization) of `case`."""
    if case in ("int8", "int4"):
        return str(bases["qwen3"]), case
    if case == "gptq-sym":
        return str(write_gptq(bases["llama"], tmp_path / case, sym=True)), "auto"
    if case == "gptq-8bit-asym":
        return str(write_gptq(bases["llama"], tmp_path / case, sym=False, bits=8)), "auto"
    if case == "gptq-act-order":
        return str(write_gptq(bases["llama"], tmp_path / case, sym=True, desc_act=True)), "auto"
    if case == "awq":
        return str(write_awq(bases["llama"], tmp_path / case)), "auto"
    projections = case.removeprefix("gguf-")
    (tmp_path / case).mkdir()
    base = bases["llama-512" if projections.endswith("_K") else "llama"]
    path = write_gguf(base, tmp_path / case / "model.gguf", projections=projections,
                      output="Q8_0")
    return str(path), "auto"


def _load(path: str, quantization: str) -> LoadedModel:
    return load_model(
        ModelConfig(model=path, dtype="bfloat16", quantization=quantization),
        attention_backend=resolve_attention_backend("auto", torch.device("cpu"), BLOCK_SIZE),
    )


def _decode_logits(loaded: LoadedModel, steps: int = 4) -> list[torch.Tensor]:
    """Every prompt prefilled, then `steps` decode steps of all of them in one batch, each
    feeding its own argmax; the decode steps' float32 logits."""
    spec = KVCacheSpec(loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, BLOCK_SIZE,
                       loaded.dtype)
    per_sequence = 16
    kv_caches = allocate_kv_caches(spec, per_sequence * len(PROMPTS), loaded.device)
    tokens = [list(p) for p in PROMPTS]
    computed = [0] * len(PROMPTS)
    outputs = []
    for step in range(steps + 1):
        requests = [
            ScheduledRequest(
                request_id=f"r{i}", token_ids=tokens[i], start=computed[i],
                num_tokens=len(tokens[i]) - computed[i],
                block_ids=list(range(i * per_sequence, (i + 1) * per_sequence)), sample=False,
                sampling_params=SamplingParams(temperature=0.0),
                num_prompt_tokens=len(PROMPTS[i]))
            for i in range(len(PROMPTS))
        ]
        batch = ScheduledBatch(requests, sum(r.num_tokens for r in requests))
        inputs = prepare_inputs(batch, BLOCK_SIZE, torch.device("cpu"))
        with torch.inference_mode():
            hidden = loaded.model(inputs.input_ids, inputs.positions, kv_caches,
                                  inputs.attn_metadata)
            last_rows = torch.tensor(
                [sum(r.num_tokens for r in requests[:i + 1]) - 1 for i in range(len(requests))])
            logits = loaded.model.compute_logits(hidden[last_rows]).float()
        if step:
            outputs.append(logits)
        for i in range(len(PROMPTS)):
            computed[i] = len(tokens[i])
            tokens[i].append(int(logits[i].argmax()))
    return outputs


def _run(loaded: LoadedModel, fused: bool, monkeypatch: pytest.MonkeyPatch):
    with fused_decode_runs(monkeypatch, fused) as calls:
        logits = _decode_logits(loaded)
    return logits, calls


@pytest.fixture(params=["int8", "bf16"])
def int_activations(request: pytest.FixtureRequest):
    previous = linear_kernel.set_int_activations(request.param)
    yield request.param
    linear_kernel.set_int_activations(previous)


@pytest.mark.parametrize(
    "case", ["int8", "int4", "gptq-sym", "gptq-8bit-asym", "awq", "gguf-Q8_0", "gguf-Q4_0"])
def test_int_projections_decode_in_one_call_bit_identical(
    case: str, int_activations: str, bases: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded = _load(*_checkpoint(case, bases, tmp_path))
    quantized = [m for name, m in loaded.model.named_modules()
                 if isinstance(m, QuantizedLinear) and "lm_head" not in name]
    assert len(quantized) == 4 * 2 and all(m.packing == "int_panels" for m in quantized)
    fused, fused_calls = _run(loaded, True, monkeypatch)
    reference, reference_calls = _run(loaded, False, monkeypatch)
    assert fused_calls == [len(PROMPTS)] * 4 and not reference_calls
    for got, want in zip(fused, reference, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["gptq-act-order", "gguf-Q4_K"])
def test_formats_the_native_layers_do_not_take_keep_the_per_op_path(
    case: str, bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _load(*_checkpoint(case, bases, tmp_path))
    _, calls = _run(loaded, True, monkeypatch)
    assert not calls
