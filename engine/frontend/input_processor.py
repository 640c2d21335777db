"""Turns a GenerationRequest into token ids and CoreRequests (the one message the engine core
takes): tokenization, chat templating and every check that needs the tokenizer or the
model's limits. Runs on the asyncio side (or in the offline LLM's caller), never on the step
thread."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine.core.core_request import CoreRequest
from engine.errors import ContextLengthError, InvalidRequestError
from engine.generation import GenerationRequest
from engine.frontend.sampling_resolution import ModelLimits, resolve_sampling_params
from engine.tokenizer import Tokenizer
from engine.tokenizer.chat_media import reject_media_parts

if TYPE_CHECKING:
    from engine.structured.validator import ConstraintValidator

_SEED_MOD = 2**63


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    token_ids: list[int]
    text: str | None


class InputProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer | None,
        limits: ModelLimits,
        model_name: str = "",
        *,
        constraints: ConstraintValidator | None = None,
    ) -> None:
        """`tokenizer` None: token ids in, token ids out (the offline LLM on a checkpoint
        without one). `constraints`: the output-constraint check before a request queues;
        None where guided decoding is not served (embedding models)."""
        self.tokenizer = tokenizer
        self.limits = limits
        # Named in errors about input the model cannot take (images, audio).
        self.model_name = model_name
        self.constraints = constraints

    async def check_constraint(self, req: GenerationRequest) -> None:
        """Validate the request's output constraint off the event loop, before it queues
        (the engine core compiles it: engine/core/intake.py). Raises InvalidRequestError
        naming the constraint field for a constraint the backend rejects."""
        if req.constraint is None:
            return
        if self.constraints is None:
            raise InvalidRequestError(
                "guided decoding is not available for this model", field="constraint"
            )
        await self.constraints.check(req.constraint)

    def prepare_prompt(self, req: GenerationRequest) -> PreparedPrompt:
        """The prompt's token ids, keeping the last truncate_prompt_tokens when asked."""
        prompt = self._tokenize_prompt(req)
        keep = req.sampling_params.truncate_prompt_tokens
        if keep is not None and keep >= 1 and len(prompt.token_ids) > keep:
            return PreparedPrompt(prompt.token_ids[-keep:], prompt.text)
        return prompt

    def _tokenize_prompt(self, req: GenerationRequest) -> PreparedPrompt:
        prompt = req.prompt
        if prompt.token_ids is not None:
            self._check_token_ids(prompt.token_ids)
            return PreparedPrompt(list(prompt.token_ids), None)
        tokenizer = self._tokenizer("prompt")
        if prompt.chat is not None:
            reject_media_parts(prompt.chat.messages, self.model_name)
            text = tokenizer.render_chat_prompt(prompt.chat)
            add_special = bool(req.add_special_tokens)
            token_ids = tokenizer.encode_chat(text, add_special_tokens=add_special)
            return PreparedPrompt(token_ids, text)
        if not prompt.text:
            raise InvalidRequestError("prompt must not be empty", field="prompt")
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        return PreparedPrompt(tokenizer.encode(prompt.text, add_special_tokens=add_special), None)

    def _tokenizer(self, field: str) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(f"{field} needs the model's tokenizer, and it has none",
                                      field=field)
        return self.tokenizer

    def _check_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt must not be empty", field="prompt")
        vocab_size = self.limits.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})", field="prompt"
            )

    def make_requests(self, req: GenerationRequest, prompt: PreparedPrompt) -> list[CoreRequest]:
        """One CoreRequest per choice (n, or best_of, of them), with max_tokens resolved.
        The sampling params were validated where the request entered the engine.

        max_tokens larger than the model's context is an error; a max_tokens that merely
        does not fit after this prompt is clamped to the remaining context (the request then
        finishes with reason `length`), which is what agents that always send a large
        max_tokens need."""
        params = resolve_sampling_params(
            req.sampling_params, self.tokenizer, self.limits, beam_expansion=req.beam_expansion
        )
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
        # best_of candidates run as children too; the best n are picked when all finish.
        num_children = params.best_of or params.n
        prompt_ids = tuple(prompt.token_ids)
        return [
            CoreRequest(
                request_id=req.request_id if num_children == 1 else f"{req.request_id}-{i}",
                prompt_token_ids=prompt_ids,
                sampling_params=self._child_params(params, i),
                max_tokens=max_tokens,
                eos_token_ids=self.limits.eos_token_ids,
                priority=req.priority,
                cache_salt=req.cache_salt,
                constraint=req.constraint,
                lora=req.lora,
            )
            for i in range(num_children)
        ]

    @staticmethod
    def _child_params(params, index: int):
        # Each of n choices draws from its own seed, derived deterministically, so n > 1 with
        # a seed gives n different but reproducible samples.
        if (params.best_of or params.n) == 1 or params.seed is None:
            return params
        return replace(params, seed=(params.seed + index) % _SEED_MOD)
