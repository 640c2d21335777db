"""engine-serve with --speculative-config: greedy tokens over gRPC equal the offline engine's
without speculation, the OpenAI SDK (streamed and not) reads the same text, and the metrics
page counts the drafts under the reference's names (--metrics-compat) and ours; the same
for an EAGLE head."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from eagle_heads import make_eagle_head, make_embedding_following_target
from engine_process import EngineProcess, free_port
from metrics_reference import missing_or_wrong, scrape_families, value
from served_greedy import grpc_greedy_tokens, openai_greedy_text

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.e2e

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}
PROMPT = "the cat sat on the mat and the cat sat on the mat and the cat sat on the"
MAX_TOKENS = 24


def test_speculative_server_matches_plain_greedy_and_counts_drafts(
    shared_server: Callable[..., EngineProcess], tiny_llama_dir: Path
) -> None:
    port = free_port()
    server = shared_server("--speculative-config", json.dumps(NGRAM), "--metrics-compat",
                           "--metrics-port", str(port), role="all")
    plain = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=256)
    assert plain.tokenizer is not None
    prompt_ids = plain.tokenizer.encode(PROMPT, add_special_tokens=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    # A greedy continuation that repeats itself, to which the n-grams propose drafts.
    expected = plain.generate([prompt_ids], greedy)[0].token_ids
    repeated = prompt_ids + expected * 2
    expected_repeated = plain.generate([repeated], greedy)[0].token_ids

    assert grpc_greedy_tokens(server.grpc_address, prompt_ids, MAX_TOKENS) == expected
    assert grpc_greedy_tokens(server.grpc_address, repeated, MAX_TOKENS) == expected_repeated
    streamed = openai_greedy_text(server.http_url, PROMPT, MAX_TOKENS, stream=True)
    assert streamed == openai_greedy_text(server.http_url, PROMPT, MAX_TOKENS, stream=False)
    assert streamed

    page = scrape_families(f"http://127.0.0.1:{port}/metrics")
    assert missing_or_wrong(page) == []
    drafts = value(page, "vllm:spec_decode_num_drafts", "_total")
    proposed = value(page, "vllm:spec_decode_num_draft_tokens", "_total")
    accepted = value(page, "vllm:spec_decode_num_accepted_tokens", "_total")
    assert drafts and proposed and accepted, (drafts, proposed, accepted)
    assert accepted <= proposed
    per_position = [value(page, "vllm:spec_decode_num_accepted_tokens_per_pos", "_total",
                          position=str(i)) for i in range(NGRAM["num_speculative_tokens"])]
    assert sum(per_position) == accepted
    assert value(page, "vllm:spec_decode_num_emitted_tokens", "_total") == accepted + drafts
    assert value(page, "protoserve:spec_decode_draft_acceptance_rate") == pytest.approx(
        accepted / proposed)
    assert value(page, "protoserve:spec_decode_mean_accepted_length") == pytest.approx(
        1 + accepted / drafts)


def test_eagle_server_matches_plain_greedy_and_accepts_every_draft(
    shared_server: Callable[..., EngineProcess], tiny_llama_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """An EAGLE head that guesses its target right (tests/eagle_heads.py), served: the
    OpenAI SDK's text streamed and not agree, gRPC's tokens are the offline engine's without
    speculation, and the metrics count every draft accepted."""
    root = tmp_path_factory.mktemp("eagle-served")
    target_dir = make_embedding_following_target(root / "target", tiny_llama_dir)
    for path in tiny_llama_dir.iterdir():  # the tokenizer and chat template
        if not (target_dir / path.name).exists():
            shutil.copy(path, target_dir / path.name)
    head_dir = make_eagle_head(root / "head", target_dir, follows_embedding=True)
    eagle = {"method": "eagle", "model": str(head_dir), "num_speculative_tokens": 3}
    port = free_port()
    server = shared_server("--speculative-config", json.dumps(eagle), "--metrics-compat",
                           "--metrics-port", str(port), role="all", model_dir=target_dir)
    plain = LLM(str(target_dir), dtype="float32", num_kv_blocks=256)
    assert plain.tokenizer is not None
    prompt_ids = plain.tokenizer.encode(PROMPT, add_special_tokens=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = plain.generate([prompt_ids], greedy)[0].token_ids

    assert grpc_greedy_tokens(server.grpc_address, prompt_ids, MAX_TOKENS) == expected
    streamed = openai_greedy_text(server.http_url, PROMPT, MAX_TOKENS, stream=True)
    assert streamed == openai_greedy_text(server.http_url, PROMPT, MAX_TOKENS, stream=False)
    assert streamed

    page = scrape_families(f"http://127.0.0.1:{port}/metrics")
    proposed = value(page, "vllm:spec_decode_num_draft_tokens", "_total")
    assert proposed and value(page, "vllm:spec_decode_num_accepted_tokens", "_total") == proposed
