"""Verification steps stay on the one-call fused decode path in bfloat16: every row of a
verifying request runs through FusedDecodeLayers (no prefill-shaped step once decoding), and
the tokens are the non-speculative engine's, bit for bit (each decode row's projections and
attention are computed as a plain decode row's would be, with the linear kernel pinned so
that 1-row and 5-row steps use the same one)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from greedy_reference import make_peaked_model, prompts_from

from engine import linear_kernel, ops
from engine.frontend.llm import LLM
from engine.models.fused_decode import FusedDecodeLayers
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    not ops.decode_layers_available(), reason="needs the native ops with AVX512_BF16"
)

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


@pytest.fixture()
def pinned_linear_kernel() -> Iterator[None]:
    previous = linear_kernel.set_linear_kernel("avx512")
    yield
    linear_kernel.set_linear_kernel(previous)


def test_verification_rows_take_the_fused_path_with_identical_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pinned_linear_kernel: None
) -> None:
    model_dir = make_peaked_model(tmp_path / "llama", "llama")
    prompts = [prompts_from(s, [period])[0] * 4 for s, period in ((1, 7), (2, 5), (3, 11))]
    prompts.append(prompts_from(4, [20])[0])
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=32 << 20)
    expected = [out.token_ids for out in plain.generate(prompts, params)]

    fused_rows: list[int] = []
    real_run = FusedDecodeLayers.run

    def counted_run(self: FusedDecodeLayers, hidden, *args) -> None:  # type: ignore[no-untyped-def]
        fused_rows.append(hidden.shape[0])
        return real_run(self, hidden, *args)

    monkeypatch.setattr(FusedDecodeLayers, "run", counted_run)
    spec = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=32 << 20,
               speculative_config=NGRAM)
    got = [out.token_ids for out in spec.generate(prompts, params)]
    stats = spec.core.scheduler.spec.stats
    assert got == expected
    assert stats.num_accepted_tokens > 0
    # Steps with drafts had more rows than requests, and they ran fused.
    assert max(fused_rows) > len(prompts), fused_rows
