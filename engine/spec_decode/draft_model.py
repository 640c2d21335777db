"""`draft_model` proposals: a small causal LM sharing the target's tokenizer proposes its
greedy continuation.

The draft is greedy, so its proposal is a point mass, which keeps the verifier's rule (accept
x with probability p(x), engine.spec_decode.rejection) exact for any target sampling.

The draft runs on the engine's own model runner (its own paged KV cache, the same attention
backends and fused decode path as the target), so every request's draft step runs in one
batch: drafting k tokens for a batch of N requests costs k forward passes, not N * k. Each
request keeps a block list in the draft's cache and the tokens whose KV it holds, including
its own last proposals; the next proposal keeps the prefix it shares with the request's real
tokens (the accepted drafts stay, the rejected ones are overwritten) and computes only what
is new, as one prefill-shaped run (new tokens) or a decode row.

When the draft's cache has no room for a request, that request gets no drafts this step
(its blocks go back); the others carry on.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from engine.config import CacheConfig, ModelConfig
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.runner.model_runner import ModelRunner
from engine.sampling_params import SamplingParams

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


@dataclass(slots=True)
class _DraftState:
    # The tokens the draft last saw (the request's, then its own proposals).
    tokens: list[int] = field(default_factory=list)
    # How many of `tokens` have their KV in the draft's cache.
    num_cached: int = 0
    blocks: list[int] = field(default_factory=list)


class DraftModelProposer:
    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_num_seqs: int = 256) -> None:
        # A runner seeds torch's default generator (--seed): the target's seeding must stand,
        # since requests without a seed of their own draw from it.
        cuda_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            self.runner = ModelRunner(
                ModelConfig(model_path, dtype=_DTYPE_NAMES.get(dtype, "float32"),
                            device=str(device)),
                CacheConfig(enable_prefix_caching=False), max_num_seqs=max_num_seqs,
            )
        self.block_size = self.runner.block_size
        self.max_positions: int = self.runner.loaded.max_model_len
        self._free_blocks = list(range(self.runner.num_blocks - 1, -1, -1))
        self._states: dict[str, _DraftState] = {}

    def propose(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        return self.propose_batch({request_id: (token_ids, num_tokens)}).get(request_id, [])

    def propose_batch(
        self, wanted: Mapping[str, tuple[Sequence[int], int]]
    ) -> dict[str, list[int]]:
        """Up to `num_tokens` greedy draft tokens after each request's `token_ids`, all
        requests' draft steps batched together."""
        active: dict[str, int] = {}  # request -> drafts still to make
        proposals: dict[str, list[int]] = {}
        for request_id, (token_ids, num_tokens) in wanted.items():
            proposals[request_id] = []
            if num_tokens <= 0 or len(token_ids) + num_tokens > self.max_positions:
                continue
            state = self._sync(request_id, token_ids)
            # The last proposal is never fed back: its KV is not needed.
            if self._reserve(state, len(token_ids) + num_tokens - 1):
                active[request_id] = num_tokens
            else:
                self.forget(request_id)
        while active:
            requests = []
            for request_id in active:
                state = self._states[request_id]
                requests.append(ScheduledRequest(
                    request_id, state.tokens, state.num_cached,
                    len(state.tokens) - state.num_cached, state.blocks, sample=True,
                    sampling_params=_GREEDY, num_prompt_tokens=len(state.tokens)))
            output = self.runner.execute(
                ScheduledBatch(requests, sum(r.num_tokens for r in requests)))
            for request_id, token in zip(output.request_ids, output.sampled_token_ids):
                state = self._states[request_id]
                state.num_cached = len(state.tokens)
                state.tokens.append(token)
                proposals[request_id].append(token)
                active[request_id] -= 1
            active = {request_id: left for request_id, left in active.items() if left > 0}
        return proposals

    def _sync(self, request_id: str, token_ids: Sequence[int]) -> _DraftState:
        """The request's state with its tokens set to `token_ids`, keeping the KV of the
        prefix the draft saw before (at least the newest token is recomputed: its logits
        give the first proposal)."""
        state = self._states.get(request_id)
        if state is None:
            state = self._states[request_id] = _DraftState()
        shared = _common_prefix(state.tokens, token_ids)
        state.num_cached = min(state.num_cached, shared, len(token_ids) - 1)
        state.tokens = list(token_ids)
        return state

    def _reserve(self, state: _DraftState, num_positions: int) -> bool:
        needed = -(-num_positions // self.block_size) - len(state.blocks)
        if needed > len(self._free_blocks):
            return False
        for _ in range(needed):
            state.blocks.append(self._free_blocks.pop())
        return True

    def forget(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self._free_blocks.extend(reversed(state.blocks))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
