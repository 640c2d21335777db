"""Seeded random workloads: arrivals over time, shared prompt prefixes, tenants, small pools,
small budgets, both policies, EOS / stop tokens from the script, and random aborts.

Each request's outcome is compared with a reference that restates the stop rules over the
scripted greedy model: the tokens it would generate alone, cut by its own stop conditions or
by the pool's capacity. The scheduler's invariants and the runner's KV-content check run on
every step (see scheduler_harness), and the pool must drain completely at the end.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from engine.core.request import FinishReason
from scheduler_harness import EOS, Harness, TokenScript, default_token, make_request


@dataclass(frozen=True)
class Spec:
    request_id: str
    prompt: list[int]
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    priority: int
    cache_salt: str


def reference(
    spec: Spec, script: TokenScript, max_model_len: int, capacity: int
) -> tuple[list[int], FinishReason, int | None]:
    """Tokens, finish reason and stop token of `spec` generated alone. `capacity` is the
    number of KV slots in the pool: a sequence may reach capacity + 1 tokens, because the
    newest token needs no slot until it is computed."""
    prompt_len = len(spec.prompt)
    if prompt_len > capacity:
        return [], FinishReason.LENGTH, None
    tokens: list[int] = []
    while True:
        token = script(spec.request_id, prompt_len + len(tokens))
        tokens.append(token)
        total = prompt_len + len(tokens)
        if len(tokens) >= spec.min_tokens:
            if token == EOS and not spec.ignore_eos:
                return tokens, FinishReason.STOP, None
            if token in spec.stop_token_ids:
                return tokens, FinishReason.STOP, token
        if len(tokens) >= spec.max_tokens or total >= max_model_len or total > capacity:
            return tokens, FinishReason.LENGTH, None


def make_script(seed: int) -> TokenScript:
    def token(request_id: str, position: int) -> int:
        if (sum(request_id.encode()) * 31 + position * 17 + seed) % 13 == 0:
            return EOS
        return default_token(request_id, position)

    return token


def random_specs(rng: random.Random, max_model_len: int, policy: str) -> list[Spec]:
    stems = [[rng.randrange(10, 99) for _ in range(rng.randint(0, 16))] for _ in range(3)]
    specs = []
    for i in range(rng.randint(3, 16)):
        tail = [rng.randrange(10, 99) for _ in range(rng.randint(1, 10))]
        prompt = (rng.choice(stems) + tail)[: max_model_len - 1]
        max_tokens = rng.randint(1, 24)
        specs.append(
            Spec(
                request_id=f"r{i}",
                prompt=prompt,
                max_tokens=max_tokens,
                min_tokens=rng.choice([0, 0, rng.randint(0, max_tokens)]),
                ignore_eos=rng.random() < 0.2,
                stop_token_ids=tuple(rng.sample(range(100, 189), rng.choice([0, 0, 3]))),
                priority=rng.randint(0, 3) if policy == "priority" else 0,
                cache_salt=rng.choice(["", "", "t1"]),
            )
        )
    return specs


@pytest.mark.parametrize("seed", range(60))
def test_random_workload_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    policy = rng.choice(["fcfs", "priority"])
    block_size = rng.choice([1, 2, 4, 8])
    # Sized in tokens so most prompts fit, while long generations still run out of blocks.
    num_blocks = max(2, rng.randint(12, 64) // block_size)
    max_model_len = rng.randint(8, 60)
    script = make_script(seed)
    h = Harness(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=rng.randint(1, 6),
        max_num_batched_tokens=rng.randint(1, 32),
        policy=policy,
        max_model_len=max_model_len,
        script=script,
        enable_prefix_caching=rng.random() < 0.8,
    )
    specs = random_specs(rng, max_model_len, policy)
    arrivals = sorted(rng.randrange(0, 40) for _ in specs)
    aborted: dict[str, FinishReason] = {}
    step = 0
    while step < 3000:
        for spec, arrival in zip(specs, arrivals):
            if arrival == step:
                h.add(
                    make_request(
                        spec.request_id,
                        spec.prompt,
                        max_tokens=spec.max_tokens,
                        min_tokens=spec.min_tokens,
                        ignore_eos=spec.ignore_eos,
                        stop_token_ids=spec.stop_token_ids,
                        priority=spec.priority,
                        cache_salt=spec.cache_salt,
                        arrival_time=float(step),
                    )
                )
        if h.scheduler.requests and rng.random() < 0.02:
            victim = rng.choice(sorted(h.scheduler.requests))
            reason = rng.choice([FinishReason.ABORT, FinishReason.CANCELLED])
            assert h.abort([victim], reason) == [victim]
            aborted[victim] = reason
        if step > max(arrivals) and not h.scheduler.has_unfinished_requests:
            break
        h.step()
        step += 1
    assert not h.scheduler.has_unfinished_requests, "workload never finished"
    h.record(h.scheduler.take_pending_outputs())

    capacity = num_blocks * block_size
    for spec in specs:
        result = h.results[spec.request_id]
        tokens, reason, stop_token_id = reference(spec, script, max_model_len, capacity)
        if spec.request_id in aborted:
            assert result.finish_reason == aborted[spec.request_id]
            assert tokens[: len(result.tokens)] == result.tokens
        else:
            assert (result.tokens, result.finish_reason, result.stop_token_id) == (
                tokens,
                reason,
                stop_token_id,
            ), spec
    h.assert_drained()
