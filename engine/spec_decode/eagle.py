"""`eagle` proposals: an EAGLE-1 head (engine.spec_decode.eagle_head) guesses the next
tokens from the target's own final hidden states.

Two halves, both on the engine core's step thread:

- After every forward pass the runner hands over the target's hidden states
  (`observe_step`). For each speculating request, the rows whose tokens are now settled
  (a prefill chunk's rows; a verification's newest token and accepted drafts) run through the
  head in one batch for all requests, paired with the token after each (the next prompt
  token, the accepted draft, or the token just sampled). That writes the head's KV for those
  positions and leaves the head's output at the newest settled position.
- When the scheduler asks for k drafts (`propose_batch`, all requests of the step at
  once), the LM head on that output gives the first draft; each further draft runs the head
  one position on its own guess (its output standing in for the target's hidden state), one
  batch for all requests still drafting. Those guessed positions' KV is dropped when the
  next step's settled rows arrive, so the head's cache only ever holds the target's features.

The head's KV lives in a dense per-request cache here, not in the paged KV cache: a request
that starts from a prefix-cache hit has no head KV for the cached positions (the target did
not compute their hidden states this time), so its head attends only to the positions
computed for it. Proposals are then weaker guesses; outputs never change, since every draft
is verified by the target. Drafts are the head's greedy choice (a point mass), which keeps
the verifier's rule exact for any sampling.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from engine.core.batch import ScheduledRequest
from engine.core.outputs import ModelRunnerOutput
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.eagle_head import DraftKV, EagleHead, Segment
from engine.spec_decode.eligibility import params_speculate
from engine.spec_decode.target import generation_runner


@dataclass(slots=True)
class _HeadState:
    cache: DraftKV
    # Positions first_position .. settled_end - 1 hold the target's features.
    settled_end: int
    # The head's output at settled_end - 1, and the token it was fed with there
    # (x(settled_end), the request's newest token when the state is current).
    last_output: torch.Tensor
    last_token: int


@dataclass(frozen=True, slots=True)
class SettledRows:
    """`hidden` [n, hidden]: the target's states at positions start .. start + n - 1;
    `next_token_ids[i]`: the token at position start + i + 1."""

    request_id: str
    start: int
    next_token_ids: Sequence[int]
    hidden: torch.Tensor


class EagleProposer:
    def __init__(self, head: EagleHead,
                 embedding: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                 compute_logits: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | None = None) -> None:
        """`embedding`: the token embedding matrix (the head's own, or the target's), or
        token ids -> its rows on `device` (the target's embedding module: a tied one may hold
        its matrix only as LM-head panels); `compute_logits`: the target's LM head (rows ->
        float32 logits)."""
        self.head = head
        if isinstance(embedding, torch.Tensor):
            self.embed: Callable[[torch.Tensor], torch.Tensor] = embedding.__getitem__
            self.device = embedding.device
        else:
            assert device is not None, "an embedding function needs its device"
            self.embed, self.device = embedding, device
        self.compute_logits = compute_logits
        self._states: dict[str, _HeadState] = {}

    def observe_step(self, requests: Sequence[ScheduledRequest], row_starts: Sequence[int],
                     hidden: torch.Tensor, output: ModelRunnerOutput) -> None:
        """The runner's hook: every speculating request's settled rows of this forward."""
        sampled = dict(zip(output.request_ids, output.sampled_token_ids))
        settled: list[SettledRows] = []
        for request, row in zip(requests, row_starts):
            if not params_speculate(request.sampling_params) or request.num_tokens == 0:
                continue
            start, end = request.start, request.start + request.num_tokens
            if request.draft_token_ids:
                accepted = output.num_accepted_drafts[request.request_id]
                drafts = list(request.draft_token_ids)
                next_ids = [*drafts[:accepted], sampled[request.request_id]]
            elif request.sample:
                next_ids = [*request.token_ids[start + 1 : end], sampled[request.request_id]]
            else:  # a prompt chunk: the token after its last row is the next chunk's first
                next_ids = list(request.token_ids[start + 1 : end + 1])
            settled.append(SettledRows(request.request_id, start, next_ids,
                                       hidden[row : row + len(next_ids)]))
        if settled:
            self.extend(settled)

    @torch.inference_mode()
    def extend(self, settled: Sequence[SettledRows]) -> None:
        """Run the head over settled rows of several requests in one batch."""
        segments, positions, tokens = [], [], []
        for rows in settled:
            state = self._states.get(rows.request_id)
            cache = self._cache_from(state, rows.start) if state is not None else None
            if cache is None:  # new, or restarted before the head's first position
                cache = self.head.new_cache(rows.start)
            n = len(rows.next_token_ids)
            segments.append(Segment(cache, n))
            positions.extend(range(rows.start, rows.start + n))
            tokens.extend(rows.next_token_ids)
        device = self.device
        token_ids = torch.tensor(tokens, dtype=torch.long, device=device)
        features = torch.cat([rows.hidden for rows in settled]).to(self.head.dtype)
        out = self.head.forward(
            self.embed(token_ids), features,
            torch.tensor(positions, dtype=torch.long, device=device), segments)
        last = 0
        for rows, segment in zip(settled, segments):
            last += segment.num_rows
            self._states[rows.request_id] = _HeadState(
                segment.cache, rows.start + segment.num_rows, out[last - 1],
                rows.next_token_ids[-1])

    @staticmethod
    def _cache_from(state: _HeadState, start: int) -> DraftKV | None:
        """The request's cache cut back to the positions before `start` (dropping guessed
        positions and anything a preempted request recomputes), or None when it cannot
        continue there (a gap, or a restart before its first position)."""
        cache = state.cache
        if not cache.first_position <= start <= state.settled_end:
            return None
        cache.length = start - cache.first_position
        return cache

    def propose(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        return self.propose_batch({request_id: (token_ids, num_tokens)}).get(request_id, [])

    @torch.inference_mode()
    def propose_batch(
        self, wanted: Mapping[str, tuple[Sequence[int], int]]
    ) -> dict[str, list[int]]:
        """Up to `num_tokens` drafts after each request's `token_ids`; the head's steps run
        every request still drafting as one batch."""
        proposals: dict[str, list[int]] = {}
        active: list[tuple[str, _HeadState, int]] = []
        for request_id, (token_ids, num_tokens) in wanted.items():
            proposals[request_id] = []
            state = self._states.get(request_id)
            # The head must have settled every position before the newest token, fed
            # with it; otherwise (a request it has not caught up with) no drafts.
            if (state is None or state.settled_end != len(token_ids) - 1
                    or state.last_token != token_ids[-1] or num_tokens <= 0):
                continue
            state.cache.length = state.settled_end - state.cache.first_position
            active.append((request_id, state, num_tokens))
        if not active:
            return proposals
        outputs = torch.stack([state.last_output for _, state, _ in active])
        device = self.device
        for step in range(max(count for _, _, count in active)):
            tokens = self.compute_logits(outputs).argmax(dim=-1).tolist()
            for (request_id, _, _), token in zip(active, tokens):
                proposals[request_id].append(token)
            going = [i for i, (_, _, count) in enumerate(active) if count > step + 1]
            if not going:
                break
            rows = torch.tensor(going, device=device)
            token_ids = torch.tensor([tokens[i] for i in going], device=device)
            positions = torch.tensor([active[i][1].settled_end + step for i in going],
                                     device=device)
            active = [active[i] for i in going]
            outputs = self.head.forward(self.embed(token_ids), outputs[rows], positions,
                                        [Segment(state.cache, 1) for _, state, _ in active])
        return proposals

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)


def build_eagle_proposer(config: SpeculativeConfig, target: object) -> EagleProposer:
    """The head for `target`'s generation runner, attached as its hidden-state hook."""
    runner = generation_runner(target, "eagle")
    model = runner.loaded.model
    dims = getattr(model, "dims", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if dims is None or embed is None:
        raise ValueError("speculative config method 'eagle' needs a decoder target "
                         f"(got {type(model).__name__})")
    assert config.model is not None  # the config refuses eagle without one
    head = EagleHead(config.model, hidden_size=dims.hidden_size, vocab_size=dims.vocab_size,
                     dtype=runner.loaded.dtype, device=runner.device)
    embedding = head.embed_tokens if head.embed_tokens is not None else embed
    proposer = EagleProposer(head, embedding, model.compute_logits, runner.device)
    runner.hidden_state_hook = proposer.observe_step
    return proposer
