"""The one-call decode path (engine/models/fused_decode.py) against the per-op path it
replaces: the same kernels in the same order, so tokens and logprobs are bit-identical, for
every family (q/k norms, Gemma's norms, GeGLU, soft-caps and windows over KV cache groups,
Gemma 3's two RoPE tables, Phi-3, Granite's multipliers, MoE layers with native routing),
over ragged concurrent contexts; and it stays out of the way where it does not apply."""
from __future__ import annotations

from pathlib import Path

import pytest
from family_configs import FAMILIES
from fused_decode_runs import fused_decode_runs
from model_factory import build_tiny_model

from engine import ops
from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    not ops.decode_layers_available(), reason="needs the native ops with AVX512_BF16"
)

PROMPTS = [[5 + i % 7] * n for i, n in enumerate([3, 17, 40, 9, 70, 25])]
PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)


def _run(model_dir: Path, fused: bool, monkeypatch: pytest.MonkeyPatch, dtype: str = "bfloat16"):
    with fused_decode_runs(monkeypatch, fused) as calls:
        llm = LLM(str(model_dir), dtype=dtype, kv_cache_memory=64 << 20, max_num_seqs=8)
        outputs = llm.generate(PROMPTS, PARAMS)
    return outputs, calls


# GPT-OSS's attention sinks and biased, clamped experts have no native decode layer yet: it
# decodes per-op (test_gpt_oss_keeps_the_per_op_path below).
FUSED_FAMILIES = [family for family in FAMILIES if family != "gpt_oss"]


@pytest.mark.parametrize("arch", [*FUSED_FAMILIES, "mistral_window"])
def test_fused_decode_equals_the_per_op_path(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=128, num_heads=4,
                                 num_kv_heads=2, num_layers=3)
    fused, fused_calls = _run(model_dir, True, monkeypatch)
    reference, reference_calls = _run(model_dir, False, monkeypatch)
    assert fused_calls and max(fused_calls) == len(PROMPTS)  # decode steps took the fused path
    assert not reference_calls
    for got, want in zip(fused, reference, strict=True):
        assert got.token_ids == want.token_ids
        assert [(lp.token_id, lp.logprob, lp.top_token_ids, lp.top_logprobs) for lp in got.logprobs] \
            == [(lp.token_id, lp.logprob, lp.top_token_ids, lp.top_logprobs) for lp in want.logprobs]


def test_gpt_oss_keeps_the_per_op_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = build_tiny_model(tmp_path / "gpt_oss", arch="gpt_oss", hidden_size=128,
                                 num_heads=4, num_kv_heads=2, num_layers=3)
    outputs, calls = _run(model_dir, True, monkeypatch)
    assert not calls
    assert all(len(out.token_ids) == PARAMS.max_tokens for out in outputs)


def test_float32_keeps_the_per_op_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = build_tiny_model(tmp_path / "llama", hidden_size=128, num_heads=4, num_kv_heads=2)
    _, calls = _run(model_dir, True, monkeypatch, dtype="float32")
    assert not calls


def test_partial_rotary_keeps_the_per_op_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel rotates whole heads: a model rotating part of each head (Phi-3's
    partial_rotary_factor) decodes through the per-op path, whole."""
    model_dir = build_tiny_model(tmp_path / "phi3", arch="phi3", hidden_size=128, num_heads=4,
                                 num_kv_heads=2, partial_rotary_factor=0.5)
    outputs, calls = _run(model_dir, True, monkeypatch)
    assert not calls
    assert all(len(out.token_ids) == PARAMS.max_tokens for out in outputs)
