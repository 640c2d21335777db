"""Turns a GenerationRequest into token ids and engine Requests: tokenization, chat
templating and every check that needs the tokenizer or the model's limits. Runs on the
asyncio side, never on the step thread."""
from __future__ import annotations

from dataclasses import dataclass, replace

from engine.errors import ContextLengthError, InvalidRequestError
from engine.generation import GenerationRequest
from engine.request import Request
from engine.tokenizer import Tokenizer

_SEED_MOD = 2**63


@dataclass(frozen=True, slots=True)
class ModelLimits:
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    # Tokens the whole KV cache can hold: a prompt beyond it can never run.
    kv_capacity_tokens: int


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    token_ids: list[int]
    text: str | None


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, limits: ModelLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits

    def prepare_prompt(self, req: GenerationRequest) -> PreparedPrompt:
        prompt = req.prompt
        if prompt.chat is not None:
            chat = prompt.chat
            if not chat.messages:
                raise InvalidRequestError("messages must not be empty", field="messages")
            text = self.tokenizer.render_chat(
                chat.messages,
                add_generation_prompt=chat.add_generation_prompt,
                continue_final_message=chat.continue_final_message,
                chat_template=chat.chat_template,
                chat_template_kwargs=chat.chat_template_kwargs,
                tools=chat.tools,
                documents=chat.documents,
            )
            add_special = bool(req.add_special_tokens)
            return PreparedPrompt(self.tokenizer.encode(text, add_special_tokens=add_special), text)
        if prompt.token_ids is not None:
            self._check_token_ids(prompt.token_ids)
            return PreparedPrompt(list(prompt.token_ids), None)
        if not prompt.text:
            raise InvalidRequestError("prompt must not be empty", field="prompt")
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        return PreparedPrompt(self.tokenizer.encode(prompt.text, add_special_tokens=add_special), None)

    def _check_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt must not be empty", field="prompt")
        vocab_size = self.limits.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})", field="prompt"
            )

    def make_requests(self, req: GenerationRequest, prompt: PreparedPrompt) -> list[Request]:
        """One engine Request per choice (n of them), with max_tokens resolved.

        max_tokens larger than the model's context is an error; a max_tokens that merely
        does not fit after this prompt is clamped to the remaining context (the request then
        finishes with reason `length`), which is what agents that always send a large
        max_tokens need."""
        params = req.sampling_params
        params.validate()
        num_prompt = len(prompt.token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("prompt must not be empty (it tokenized to no tokens)", field="prompt")
        max_len = self.limits.max_model_len
        if num_prompt >= max_len:
            raise ContextLengthError(
                f"prompt has {num_prompt} tokens but the model's context is {max_len} tokens "
                "(at least one token must remain for the output)",
                field="prompt",
            )
        if num_prompt + 1 > self.limits.kv_capacity_tokens:
            raise ContextLengthError(
                f"prompt has {num_prompt} tokens but the KV cache holds only "
                f"{self.limits.kv_capacity_tokens} tokens",
                field="prompt",
                reason="KV_CAPACITY_EXCEEDED",
            )
        if params.max_tokens is not None and params.max_tokens > max_len:
            raise InvalidRequestError(
                f"max_tokens ({params.max_tokens}) exceeds the model's context of {max_len} tokens",
                field="max_tokens",
            )
        for token_id in params.stop_token_ids:
            if not 0 <= token_id < self.limits.vocab_size:
                raise InvalidRequestError(f"stop token id {token_id} is outside the vocabulary", field="stop_token_ids")
        max_tokens = max_len - num_prompt
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        return [
            Request(
                request_id=req.request_id if params.n == 1 else f"{req.request_id}-{i}",
                prompt_token_ids=prompt.token_ids,
                sampling_params=self._child_params(params, i),
                max_tokens=max_tokens,
                eos_token_ids=self.limits.eos_token_ids,
                priority=req.priority,
                cache_salt=req.cache_salt,
            )
            for i in range(params.n)
        ]

    @staticmethod
    def _child_params(params, index: int):
        # Each of n choices draws from its own seed, derived deterministically, so n > 1 with
        # a seed gives n different but reproducible samples.
        if params.n == 1 or params.seed is None:
            return params
        return replace(params, seed=(params.seed + index) % _SEED_MOD)
