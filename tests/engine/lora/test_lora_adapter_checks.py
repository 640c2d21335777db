"""Adapters that cannot be served fail at load with an error naming the file and the field or
tensor; the bf16 fused decode path never drops an adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from greedy_reference import GREEDY, make_peaked_model, prompts_from
from lora_adapters import make_adapter

from engine import ops
from engine.config import LoRAConfig
from engine.frontend.llm import LLM
from engine.lora.adapter import LoRALoadError, load_adapter
from engine.lora.request import LoRARequest
from engine.models.fused_decode import FusedDecodeLayers
from engine.sampling_params import SamplingParams
from engine.models.decoder_spec import read_decoder_spec
from transformers import AutoConfig


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peaked_model(tmp_path_factory.mktemp("base"), "llama")


def _spec(model_dir: Path):
    return read_decoder_spec(AutoConfig.from_pretrained(model_dir))


def test_rank_over_the_maximum_names_r(base_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base_dir, tmp_path / "a", rank=8, targets=["q_proj"], seed=0)
    with pytest.raises(LoRALoadError, match=r"adapter_config.json: r=8 is over --max-lora-rank 4"):
        load_adapter(str(adapter), _spec(base_dir), max_rank=4)


def test_unsupported_target_names_the_tensor(base_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base_dir, tmp_path / "a", rank=4, targets=["q_proj", "lm_head"], seed=0)
    with pytest.raises(LoRALoadError, match=r"adapter_model.safetensors: tensor '.*lm_head"):
        load_adapter(str(adapter), _spec(base_dir), max_rank=16)


def test_adapter_of_another_base_model_is_refused(base_dir: Path, tmp_path: Path) -> None:
    other = make_peaked_model(tmp_path / "other", "llama")
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(base_dir, tmp_path / "a", rank=4, targets=["down_proj"], seed=0)
    with pytest.raises(LoRALoadError, match=r"down_proj has lora_A \(4, 128\).*another base model"):
        load_adapter(str(adapter), _spec(other), max_rank=16)


def test_missing_files_and_dora_are_named(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LoRALoadError, match=r"has no adapter_config.json"):
        load_adapter(str(tmp_path / "nowhere"), _spec(base_dir), max_rank=16)
    adapter = make_adapter(base_dir, tmp_path / "a", rank=4, targets=["q_proj"], seed=0)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRALoadError, match=r"adapter_config.json: use_dora=True is not supported"):
        load_adapter(str(adapter), _spec(base_dir), max_rank=16)


@pytest.mark.skipif(not ops.decode_layers_available(), reason="native fused decode not built")
def test_bf16_fused_decode_steps_apply_the_adapter(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps with adapter rows stay on the native fused layers, which add each row's
    adapter after every projection as the per-op path does (whose LoRA kernel is checked
    against the torch path by test_lora_kernel.py, and that against peft in float32 by
    test_lora_vs_peft.py): same tokens and logprobs as the per-op path, forced here by
    switching the fused layers off."""
    adapter = make_adapter(base_dir, tmp_path / "a", rank=8, targets=["v_proj", "up_proj"], seed=4)
    other = make_adapter(base_dir, tmp_path / "b", rank=4, targets=["q_proj", "o_proj",
                                                                    "down_proj"], seed=5)
    loras = [LoRARequest("a", 1, str(adapter)), None, LoRARequest("b", 2, str(other))]
    llm = LLM(str(base_dir), dtype="bfloat16", lora=LoRAConfig(max_loras=2, max_lora_rank=8))
    prompts = prompts_from(3, [7, 12, 9])
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY.max_tokens, ignore_eos=True,
                            logprobs=2)
    base_tokens = [o.token_ids for o in llm.generate(prompts, params)]
    fused = llm.runner.loaded.model._fused_decode
    assert fused is not None and fused.layers is not None, "the fused path is not in use here"
    adapter_steps = []
    real_run = FusedDecodeLayers.run

    def counted_run(self, *args):
        adapter_steps.append(args[-1] is not None)
        return real_run(self, *args)

    monkeypatch.setattr(FusedDecodeLayers, "run", counted_run)
    mixed = llm.generate(prompts, params, lora_requests=loras)
    assert any(adapter_steps), "no decode step with adapter rows took the fused layers"
    assert mixed[0].token_ids != base_tokens[0] and mixed[2].token_ids != base_tokens[2]
    assert mixed[1].token_ids == base_tokens[1]
    fused.layers = None  # every step per op from here on
    per_op = llm.generate(prompts, params, lora_requests=loras)
    for got, want in zip(mixed, per_op, strict=True):
        assert got.token_ids == want.token_ids
        assert [(lp.token_id, lp.logprob, lp.top_logprobs) for lp in got.logprobs] == \
            [(lp.token_id, lp.logprob, lp.top_logprobs) for lp in want.logprobs]


def test_an_adapter_gone_bad_fails_its_request_not_the_engine(
    base_dir: Path, tmp_path: Path
) -> None:
    """The serving side checked the directory; it changed before the core read it: that
    request is refused on arrival with the file named, and the engine serves the next one."""
    llm = LLM(str(base_dir), dtype="float32", lora=LoRAConfig(max_loras=1, max_lora_rank=8))
    gone = LoRARequest("gone", 1, str(tmp_path / "deleted-adapter"))
    prompt = prompts_from(4, [5])[0]
    with pytest.raises(LoRALoadError, match=r"deleted-adapter' has no adapter_config.json"):
        llm.generate([prompt], GREEDY, lora_requests=gone)
    adapter = make_adapter(base_dir, tmp_path / "a", rank=4, targets=["q_proj"], seed=5)
    assert len(llm.generate([prompt], GREEDY, lora_requests=LoRARequest(
        "a", 2, str(adapter)))[0].token_ids) == GREEDY.max_tokens
    llm.core.scheduler.check_invariants()
