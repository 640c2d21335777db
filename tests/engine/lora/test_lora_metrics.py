"""vllm:lora_requests_info (--metrics-compat) from a real engine core: the adapters of
running and of waiting requests, each name once in first-seen order and comma-joined as the
reference joins them, and max_lora = --max-loras."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from greedy_reference import GREEDY, make_peaked_model, prompts_from
from lora_adapters import make_adapter
from metrics_reference import parse

from engine.config import LoRAConfig
from engine.core.core_request import CoreRequest
from engine.core.loop import CoreStats
from engine.frontend.llm import LLM
from engine.lora.request import LoRARequest
from engine.server.request_tracker import load_snapshot
from protoserve.serving_metrics import ServingMetrics


def test_running_and_waiting_adapters_and_max_lora(tmp_path: Path) -> None:
    base = make_peaked_model(tmp_path / "base", "llama")
    loras = {name: LoRARequest(name, i + 1, str(make_adapter(
        base, tmp_path / name, rank=4, targets=["q_proj"], seed=i))) for i, name in
        enumerate(["alpha", "beta"])}
    llm = LLM(str(base), dtype="float32", max_num_seqs=1,
              lora=LoRAConfig(max_loras=2, max_lora_rank=8))
    order = [loras["alpha"], loras["beta"], None, loras["alpha"]]
    for i, (prompt, lora) in enumerate(zip(prompts_from(6, [5, 6, 7, 8]), order, strict=True)):
        llm.core.add_request(CoreRequest(f"r{i}", tuple(prompt), GREEDY, GREEDY.max_tokens,
                                         lora=lora))
    llm.core.step()  # one running (max_num_seqs=1), three waiting
    stats = CoreStats.of(llm.core)
    assert (stats.running_lora_adapters, stats.waiting_lora_adapters, stats.max_lora) == (
        ("alpha",), ("beta", "alpha"), 2)
    engine = SimpleNamespace(loop=SimpleNamespace(stats=lambda: stats))
    metrics = ServingMetrics("m", load=lambda: load_snapshot(engine), compat_prefixes=("vllm",))
    [sample] = parse(metrics.render().decode())["vllm:lora_requests_info"][1]
    assert sample.labels == {"running_lora_adapters": "alpha", "max_lora": "2",
                             "waiting_lora_adapters": "beta,alpha"}
    # Without LoRA the reference's idle labels.
    plain = CoreStats.of(LLM(str(base), dtype="float32").core)
    assert (plain.running_lora_adapters, plain.waiting_lora_adapters, plain.max_lora) == (
        (), (), 0)
