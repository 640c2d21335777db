"""Logprobs on the scheduler's outputs: prompt logprobs gathered chunk by chunk and handed out
with a request's first output token, and sampled-token logprobs attached per step."""
from __future__ import annotations

from engine.core.outputs import ModelRunnerOutput, RequestOutput
from engine.core.request import Request


def record_prompt_logprobs(requests: dict[str, Request], output: ModelRunnerOutput) -> None:
    """Store the prompt positions this step's prefill chunks scored on their requests."""
    for request_id, (first_position, entries) in output.prompt_logprobs.items():
        request = requests.get(request_id)
        if request is None:
            continue
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None] * request.num_prompt_tokens
        request.prompt_logprobs[first_position : first_position + len(entries)] = entries


def attach_logprobs(
    out: RequestOutput, request: Request, output: ModelRunnerOutput, row: int
) -> None:
    """The sampled token's logprobs (requests asking for them never carry drafts, so a step
    gives them one token) and, with the first output token, the prompt's."""
    if output.logprobs is not None and output.logprobs[row] is not None:
        out.logprobs = [output.logprobs[row]]
    if request.sampling_params.prompt_logprobs is not None and request.num_output_tokens == 1:
        # A one-token prompt has nothing to score: its single entry is None.
        out.prompt_logprobs = request.prompt_logprobs or [None] * request.num_prompt_tokens
        request.prompt_logprobs = None
