"""prompt_logprobs: score each prompt token under the model, chunk by chunk.

The hidden state at position p predicts token p + 1, so a prefill chunk computing positions
[start, end) scores prompt tokens start + 1 .. min(end, num_prompt) - 1:

    prompt:   t0  t1  t2  t3  t4  t5        (num_prompt = 6)
    chunk 1:  [t0  t1  t2]                  scores t1 t2 t3   (rows 0..2)
    chunk 2:              [t3  t4  t5]      scores t4 t5      (row of t5 predicts output 0)

Every position is scored exactly once as long as the prompt is computed from position 0, which
is why a request asking for prompt_logprobs takes no prefix-cache hits. Logprobs here are the
model's raw distribution (log_softmax of the logits): sampling transforms belong to outputs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.core.batch import ScheduledRequest
from engine.core.outputs import TokenLogprobs
from engine.sampling.logprobs import compute_token_logprobs


def needs_prompt_logprobs(request: ScheduledRequest) -> bool:
    """Asked for, and the prompt is being computed for the first time (no output yet: a
    request resumed after preemption has already reported its prompt)."""
    return (
        request.sampling_params.prompt_logprobs is not None
        and request.num_output_tokens == 0
        and request.start < request.num_prompt_tokens - 1
    )


def score_prompt_chunks(
    requests: Sequence[ScheduledRequest],
    row_starts: Sequence[int],
    hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, tuple[int, list[TokenLogprobs]]]:
    """request_id -> (first prompt position scored, one entry per consecutive position)."""
    rows: list[int] = []
    targets: list[int] = []
    num_top: list[int] = []
    spans: list[tuple[str, int, int]] = []
    for request, row_start in zip(requests, row_starts):
        if not needs_prompt_logprobs(request):
            continue
        end = min(request.start + request.num_tokens, request.num_prompt_tokens - 1)
        count = end - request.start
        rows.extend(range(row_start, row_start + count))
        targets.extend(request.token_ids[request.start + 1 : end + 1])
        num_top.extend([request.sampling_params.prompt_logprobs or 0] * count)
        spans.append((request.request_id, request.start + 1, count))
    if not rows:
        return {}
    device = hidden.device
    logits = compute_logits(hidden.index_select(0, torch.tensor(rows, device=device)))
    entries = compute_token_logprobs(logits, torch.tensor(targets, device=device), num_top)
    scored: dict[str, tuple[int, list[TokenLogprobs]]] = {}
    offset = 0
    for request_id, first_position, count in spans:
        scored[request_id] = (first_position, entries[offset : offset + count])
        offset += count
    return scored
