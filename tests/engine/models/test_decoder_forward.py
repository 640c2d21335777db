"""Our paged forward pass against transformers' logits for the same token ids (float32), for
every decoder family."""
from __future__ import annotations

import random

import pytest
import torch
from family_configs import FAMILIES, family_config
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from engine.attention import resolve_attention_backend
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.config import ModelConfig
from engine.models.loader import LoadedModel, load_model
from engine.runner.input_prep import prepare_inputs
from engine.runner.kv_memory import KVCacheSpec, allocate_kv_caches
from engine.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 64
VOCAB_SIZE = 320
SMALL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # Larger than the HF default (0.02) so attention is far from uniform and logits are
    # sensitive to every detail of the forward pass.
    initializer_range=0.15,
)

CONFIGS: dict[str, PretrainedConfig] = {
    "llama_untied": LlamaConfig(**SMALL),
    "llama_tied_head_dim_bias": LlamaConfig(
        **SMALL, head_dim=32, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    ),
    "llama3_rope": LlamaConfig(
        **SMALL,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama_linear_rope": LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}
    ),
    "mistral": MistralConfig(**SMALL, sliding_window=None),
    "qwen2_tied_bias": Qwen2Config(**SMALL, tie_word_embeddings=True),
    **{family: family_config(family, **SMALL) for family in FAMILIES if family != "llama"},
    "mistral_window": family_config("mistral_window", **SMALL),
}


class PagedSequence:
    """One sequence over the paged cache, with block ids drawn at random (non-contiguous)."""

    def __init__(self, loaded: LoadedModel, token_ids: list[int], seed: int) -> None:
        self.loaded = loaded
        self.token_ids = token_ids
        spec = KVCacheSpec(
            loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, BLOCK_SIZE, loaded.dtype
        )
        self.kv_caches = allocate_kv_caches(spec, NUM_BLOCKS, loaded.device)
        self.block_ids = random.Random(seed).sample(range(NUM_BLOCKS), NUM_BLOCKS)
        self.num_computed = 0

    def step(self, num_tokens: int) -> torch.Tensor:
        """Compute the next num_tokens tokens; float32 logits of every computed row."""
        request = ScheduledRequest(
            request_id="r",
            token_ids=self.token_ids,
            start=self.num_computed,
            num_tokens=num_tokens,
            block_ids=self.block_ids,
            sample=False,
            sampling_params=SamplingParams(temperature=0.0),
            num_prompt_tokens=len(self.token_ids),
        )
        batch = ScheduledBatch([request], num_tokens)
        inputs = prepare_inputs(batch, BLOCK_SIZE, torch.device("cpu"))
        with torch.inference_mode():
            hidden = self.loaded.model(
                inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_metadata
            )
            logits = self.loaded.model.compute_logits(hidden)
        self.num_computed += num_tokens
        return logits


def reference_logits(hf_model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def random_ids(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (count,), generator=generator).tolist()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_match_reference(tiny_checkpoint, name: str) -> None:
    model_dir, hf_model = tiny_checkpoint(CONFIGS[name])
    loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32"))
    prompt = random_ids(13, seed=1)
    sequence = PagedSequence(loaded, list(prompt), seed=2)

    assert_logits_close(sequence.step(len(prompt)), reference_logits(hf_model, prompt))
    # Decode: feed the reference's greedy token, reading the prompt back from the paged cache.
    for _ in range(6):
        expected = reference_logits(hf_model, sequence.token_ids)[-1:]
        sequence.token_ids.append(int(expected.argmax()))
        expected = reference_logits(hf_model, sequence.token_ids)[-1:]
        assert_logits_close(sequence.step(1), expected)


@pytest.mark.parametrize(
    "name",
    ["llama_untied", "qwen2_tied_bias", "qwen3_moe", "gemma2", "gemma3", "mistral_window", "gpt_oss"],
)
def test_chunked_prefill_matches_reference(tiny_checkpoint, name: str) -> None:
    model_dir, hf_model = tiny_checkpoint(CONFIGS[name])
    loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32"))
    prompt = random_ids(23, seed=3)
    expected = reference_logits(hf_model, prompt)
    sequence = PagedSequence(loaded, list(prompt), seed=4)
    # Chunk boundaries fall inside blocks (block size 4) on purpose.
    chunks = [7, 9, 7]
    actual = torch.cat([sequence.step(num_tokens) for num_tokens in chunks])
    assert_logits_close(actual, expected)


def test_bfloat16_forward_tracks_float32(tiny_checkpoint) -> None:
    config = LlamaConfig(**SMALL)
    model_dir, _ = tiny_checkpoint(config)
    prompt = random_ids(24, seed=5)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(ModelConfig(model=str(model_dir), dtype=dtype))
        assert loaded.dtype == getattr(torch, dtype)
        assert loaded.model.model.embed_tokens.weight.dtype == loaded.dtype
        logits[dtype] = PagedSequence(loaded, list(prompt), seed=6).step(len(prompt))
    assert logits["bfloat16"].dtype == torch.float32
    assert torch.isfinite(logits["bfloat16"]).all()
    agreement = (logits["bfloat16"].argmax(-1) == logits["float32"].argmax(-1)).float().mean()
    assert agreement >= 0.75
    relative_error = (logits["bfloat16"] - logits["float32"]).norm() / logits["float32"].norm()
    assert relative_error < 0.05


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("family", [*FAMILIES, "mistral_window"])
def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(
    tiny_checkpoint, family: str
) -> None:
    """Our bf16 forward (the CPU kernels: packed linears, fused norms, paged attention, the
    experts' kernel) over a prefill and decode steps, against transformers' float32 logits:
    no further from them than transformers' own bf16 model is."""
    model_dir, hf_model = tiny_checkpoint(family_config(family, **SMALL))
    hf_bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    loaded = load_model(
        ModelConfig(model=str(model_dir), dtype="bfloat16"),
        attention_backend=resolve_attention_backend("auto", torch.device("cpu"), BLOCK_SIZE),
    )
    prompt = random_ids(13, seed=7)
    sequence = PagedSequence(loaded, list(prompt), seed=8)
    ours = [sequence.step(len(prompt))]
    for _ in range(4):  # decode rows: the fused decode path where it applies
        sequence.token_ids.append(int(ours[-1][-1].argmax()))
        ours.append(sequence.step(1))
    ids = sequence.token_ids
    ours_all = torch.cat(ours)
    expected = reference_logits(hf_model, ids)[: len(ids)]
    theirs = reference_logits(hf_bf16, ids)[: len(ids)]
    assert torch.isfinite(ours_all).all()
    our_error, their_error = _relative_error(ours_all, expected), _relative_error(theirs, expected)
    # bf16 rounding differs in where it happens (fused kernels, float32 accumulation), not in
    # how much: within 1.25x of the reference's own bf16 error.
    assert our_error <= 1.25 * their_error + 1e-3, (our_error, their_error)
