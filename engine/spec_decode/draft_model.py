"""`draft_model` proposals: a small causal LM sharing the target's tokenizer proposes its
greedy continuation, one token at a time.

The draft is greedy, so its proposal is a point mass, which keeps the verifier's rule (accept
x with probability p(x), engine.spec_decode.rejection) exact for any target sampling.

The draft runs through transformers with one KV cache per request, kept between steps: the
cache holds the tokens it last saw, including its own proposals; the next proposal crops it to
the prefix it shares with the request's real tokens (the accepted drafts stay, the rejected
ones go) and feeds only what is new. Cost per step: one forward per proposed token per request,
batch 1; a draft far smaller than the target is what makes this pay.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, DynamicCache


@dataclass(slots=True)
class _DraftState:
    cache: DynamicCache
    # The tokens whose KV the cache holds, in order.
    tokens: list[int] = field(default_factory=list)
    # How many of them are known to be the request's own tokens (not proposals).
    num_real: int = 0


class DraftModelProposer:
    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.max_positions: int = getattr(self.model.config, "max_position_embeddings", 1 << 30)
        self._states: dict[str, _DraftState] = {}
        # transformers 5 renames `past_key_values` to `cache` family by family.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    @torch.inference_mode()
    def propose(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        if len(token_ids) + num_tokens > self.max_positions:
            return []
        state = self._states.get(request_id)
        if state is None:
            state = self._states[request_id] = _DraftState(DynamicCache())
        # Only the tail after the known-real prefix can differ (at most the last proposals).
        shared = state.num_real + _common_prefix(
            state.tokens[state.num_real :], token_ids[state.num_real :]
        )
        # At least the newest token is fed: its logits give the first proposal.
        shared = min(shared, len(token_ids) - 1)
        if shared < len(state.tokens):
            # transformers 5: a negative count removes that many newest tokens.
            state.cache.crop(shared - len(state.tokens))
            del state.tokens[shared:]
        new = list(token_ids[shared:])
        state.num_real = len(token_ids)
        proposals: list[int] = []
        for _ in range(num_tokens):
            logits = self.model(
                torch.tensor([new]), use_cache=True, **{self._cache_arg: state.cache}
            ).logits
            state.tokens += new
            token = int(logits[0, -1].argmax())
            proposals.append(token)
            new = [token]
        return proposals

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
