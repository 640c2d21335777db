"""Turns a GenerationRequest into token ids and engine Requests: tokenization, chat
templating and every check that needs the tokenizer or the model's limits. Runs on the
asyncio side, never on the step thread."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine.errors import ContextLengthError, InvalidRequestError
from engine.generation import GenerationRequest
from engine.core.request import Request
from engine.frontend.sampling_resolution import ModelLimits, resolve_sampling_params
from engine.tokenizer import Tokenizer
from engine.tokenizer.chat_media import reject_media_parts

if TYPE_CHECKING:
    from engine.structured.compiler import GrammarCompiler

_SEED_MOD = 2**63


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    token_ids: list[int]
    text: str | None


class InputProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        limits: ModelLimits,
        model_name: str = "",
        *,
        grammar_compiler: GrammarCompiler | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        # Named in errors about input the model cannot take (images, audio).
        self.model_name = model_name
        self.grammar_compiler = grammar_compiler

    async def attach_grammars(self, req: GenerationRequest, requests: list[Request]) -> None:
        """Compile the request's output constraint on the compiler's worker thread (never the
        step thread) and give every choice its own matcher. Raises InvalidRequestError
        naming the constraint field for a constraint the backend rejects."""
        if req.constraint is None:
            return
        if self.grammar_compiler is None:
            raise InvalidRequestError(
                "guided decoding is not available for this model", field="constraint"
            )
        grammars = await self.grammar_compiler.new_grammars_async(req.constraint, len(requests))
        for request, grammar in zip(requests, grammars, strict=True):
            request.grammar = grammar
            request.constraint = req.constraint

    def prepare_prompt(self, req: GenerationRequest) -> PreparedPrompt:
        """The prompt's token ids, keeping the last truncate_prompt_tokens when asked."""
        prompt = self._tokenize_prompt(req)
        keep = req.sampling_params.truncate_prompt_tokens
        if keep is not None and keep >= 1 and len(prompt.token_ids) > keep:
            return PreparedPrompt(prompt.token_ids[-keep:], prompt.text)
        return prompt

    def _tokenize_prompt(self, req: GenerationRequest) -> PreparedPrompt:
        prompt = req.prompt
        if prompt.chat is not None:
            reject_media_parts(prompt.chat.messages, self.model_name)
            text = self.tokenizer.render_chat_prompt(prompt.chat)
            add_special = bool(req.add_special_tokens)
            token_ids = self.tokenizer.encode_chat(text, add_special_tokens=add_special)
            return PreparedPrompt(token_ids, text)
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
        params = resolve_sampling_params(
            params, self.tokenizer, self.limits, beam_expansion=req.beam_expansion
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
        return [
            Request(
                request_id=req.request_id if num_children == 1 else f"{req.request_id}-{i}",
                prompt_token_ids=prompt.token_ids,
                sampling_params=self._child_params(params, i),
                max_tokens=max_tokens,
                eos_token_ids=self.limits.eos_token_ids,
                priority=req.priority,
                cache_salt=req.cache_salt,
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
