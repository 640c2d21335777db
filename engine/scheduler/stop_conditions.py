"""Token-level stop checks, run after every sampled token. Stop *strings* need text and are
checked by the engine loop after detokenization."""
from __future__ import annotations

from engine.core.request import FinishReason, Request


def check_stop(request: Request, max_model_len: int) -> tuple[FinishReason, int | None] | None:
    """The finish reason (and the stop token id, for stop_token_ids) after the newest token,
    or None to keep going. EOS and stop tokens are honoured only after min_tokens."""
    params = request.sampling_params
    token_id = request.all_token_ids[-1]
    num_output = request.num_output_tokens
    if num_output >= params.min_tokens:
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return FinishReason.STOP, None
        if token_id in params.stop_token_ids:
            return FinishReason.STOP, token_id
    if num_output >= request.max_tokens or request.num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None
