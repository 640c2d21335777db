"""Native step timers (csrc/cpu/step_timers.h): off, nothing accumulates; on, every region
a fused decode step and a per-op prefill step run reports calls, and the outputs are
bit-identical to the untimed run's."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from model_factory import build_tiny_model

from engine import ops, step_timers
from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    not ops.decode_layers_available(), reason="needs the native ops with AVX512_BF16"
)

PROMPTS = [[5 + i % 7] * n for i, n in enumerate([3, 17, 40, 9])]
PREFILL_ONLY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=3)
DECODE = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)

# Per-op prefill: projections and the LM head go through the linear entry point.
PREFILL_REGIONS = {"linear", "attention", "norms", "rotary"}
# The fused decode step's own regions, then the LM head (per-op linear) after it.
DECODE_REGIONS = {"qkv", "attention", "o", "norms", "rotary", "residual", "linear"}
DENSE_MLP = {"gate_up", "activation", "down"}
MOE_MLP = {"router", "experts"}


@pytest.fixture
def timers() -> Iterator[None]:
    yield
    step_timers.enable(False)
    step_timers.reset()


def _called() -> set[str]:
    return {name for name, (ns, calls) in step_timers.read().items() if calls > 0 and ns > 0}


def _outputs(llm: LLM, params: SamplingParams) -> list[tuple]:
    return [(out.token_ids,
             [(lp.token_id, lp.logprob, lp.top_token_ids, lp.top_logprobs) for lp in out.logprobs])
            for out in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize(("arch", "mlp_regions"), [("llama", DENSE_MLP), ("qwen3_moe", MOE_MLP)])
def test_step_timers_cover_every_region_and_change_nothing(
    arch: str, mlp_regions: set[str], timers: None, tmp_path: Path
) -> None:
    model_dir = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=128, num_heads=4,
                                 num_kv_heads=2, num_layers=2)
    llm = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=64 << 20, max_num_seqs=8)
    step_timers.reset()
    untimed_prefill = _outputs(llm, PREFILL_ONLY)
    untimed = _outputs(llm, DECODE)
    assert _called() == set()  # off by default: nothing accumulates

    step_timers.enable(True)
    timed_prefill = _outputs(llm, PREFILL_ONLY)
    prefill_regions = _called()
    step_timers.reset()
    timed = _outputs(llm, DECODE)
    decode_regions = _called()
    step_timers.enable(False)

    assert timed_prefill == untimed_prefill
    assert timed == untimed
    moe_prefill = {"router", "experts"} if arch == "qwen3_moe" else {"activation"}
    assert PREFILL_REGIONS | moe_prefill <= prefill_regions
    assert DECODE_REGIONS | mlp_regions <= decode_regions
    assert "lora" not in decode_regions
    step_timers.reset()
    assert _called() == set()
