"""Embedding requests -> token ids -> CoreRequests (one per input), with every check that
needs the tokenizer or the model's limits. Runs on the asyncio side, never on the step thread.

Errors name the proto field (`inputs`, `dimensions`, `truncate_prompt_tokens`); the bridge
renames them to the OpenAI ones.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ContextLengthError, InvalidRequestError
from engine.generation import EmbeddingRequest, PromptInput
from engine.core.core_request import CoreRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

# One Embed call may not fan out beyond this many engine requests.
MAX_INPUTS_PER_REQUEST = 2048


@dataclass(frozen=True, slots=True)
class EmbeddingLimits:
    max_model_len: int
    vocab_size: int
    # Width of the pooled vector: the upper bound of `dimensions`.
    hidden_size: int


class EmbeddingInputProcessor:
    def __init__(self, tokenizer: Tokenizer, limits: EmbeddingLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        # Shared by every embedding request: pooling ignores sampling entirely.
        self._sampling = SamplingParams()

    def make_requests(self, req: EmbeddingRequest) -> list[CoreRequest]:
        self._check_params(req)
        requests = []
        for index, prompt in enumerate(req.inputs):
            token_ids = self._tokenize(req, prompt, index)
            if req.truncate_prompt_tokens is not None:
                # As for generation: the last N tokens are kept.
                token_ids = token_ids[-req.truncate_prompt_tokens :]
            if len(token_ids) > self.limits.max_model_len:
                raise ContextLengthError(
                    f"input {index} has {len(token_ids)} tokens but the model takes at most "
                    f"{self.limits.max_model_len}; shorten it or set truncate_prompt_tokens",
                    field="inputs",
                )
            requests.append(
                CoreRequest(
                    request_id=f"{req.request_id}-{index}",
                    prompt_token_ids=tuple(token_ids),
                    sampling_params=self._sampling,
                    max_tokens=0,
                    priority=req.priority,
                    pooling_params=req.params,
                )
            )
        return requests

    def _check_params(self, req: EmbeddingRequest) -> None:
        if not req.inputs:
            raise InvalidRequestError("inputs must not be empty", field="inputs")
        if len(req.inputs) > MAX_INPUTS_PER_REQUEST:
            raise InvalidRequestError(
                f"at most {MAX_INPUTS_PER_REQUEST} inputs per request, got {len(req.inputs)}",
                field="inputs",
            )
        dimensions = req.params.dimensions
        hidden = self.limits.hidden_size
        if dimensions is not None and not 1 <= dimensions <= hidden:
            raise InvalidRequestError(
                f"dimensions must be between 1 and the model's {hidden}, got {dimensions}",
                field="dimensions",
            )
        keep = req.truncate_prompt_tokens
        if keep is not None and not 1 <= keep <= self.limits.max_model_len:
            raise InvalidRequestError(
                f"truncate_prompt_tokens must be between 1 and max_model_len "
                f"({self.limits.max_model_len}), got {keep}",
                field="truncate_prompt_tokens",
            )

    def _tokenize(self, req: EmbeddingRequest, prompt: PromptInput, index: int) -> list[int]:
        if prompt.chat is not None:
            chat = prompt.chat
            if not chat.messages:
                raise InvalidRequestError(
                    f"input {index}: messages must not be empty", field="messages"
                )
            text = self.tokenizer.render_chat_prompt(chat)
            add_special = bool(req.add_special_tokens)
            token_ids = self.tokenizer.encode_chat(text, add_special_tokens=add_special)
        elif prompt.token_ids is not None:
            token_ids = list(prompt.token_ids)
            vocab_size = self.limits.vocab_size
            bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"input {index}: token id {bad} is outside the vocabulary [0, {vocab_size})",
                    field="inputs",
                )
        else:
            if not prompt.text:
                raise InvalidRequestError(f"input {index} is empty", field="inputs")
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            token_ids = self.tokenizer.encode(prompt.text, add_special_tokens=add_special)
        if not token_ids:
            raise InvalidRequestError(f"input {index} has no tokens", field="inputs")
        return token_ids
