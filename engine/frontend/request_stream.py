"""Per-choice output state, the output path of served and offline generation alike:
incremental detokenization and stop strings, turning RequestOutputs from the engine core into
GenerationDelta / GenerationFinished events. It also keeps this side's own bookkeeping of
the request (first admission, prefix-cache hit), learned from the outputs: the core's
Request never leaves the core."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from engine.core.outputs import RequestOutput
from engine.core.request import FinishReason
from engine.frontend.logprob_events import to_position_logprobs, to_prompt_logprobs
from engine.generation import GenerationDelta, GenerationEvent, GenerationFinished
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from engine.tokenizer.stop_strings import StopStringMatcher


class EventSink(Protocol):
    """Where a stream's events go: the asyncio.Queue a generate() call reads, or the offline
    LLM's collector."""

    def put_nowait(self, item: GenerationEvent | BaseException) -> None: ...

    def qsize(self) -> int: ...


class RequestStream:
    def __init__(
        self,
        index: int,
        client_request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        events: EventSink,
        tokenizer: Tokenizer | None,
        return_text: bool,
    ) -> None:
        """`tokenizer` may be None only where no text is needed: no return_text, no stop
        strings, and a subclass that delivers logprobs without token texts (the offline
        LLM's)."""
        self.index = index
        self.client_request_id = client_request_id
        self.events = events
        self.num_output_tokens = 0
        # Learned from the request's first output that has them.
        self.first_scheduled_time: float | None = None
        self.num_cached_tokens = 0
        # Stop strings need text, so they force detokenization even if text is not returned.
        needs_text = return_text or bool(params.stop)
        self.detokenizer = (
            tokenizer.new_detokenizer(  # type: ignore[union-attr]
                list(prompt_token_ids),
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
            )
            if needs_text
            else None
        )
        self.return_text = return_text
        self.tokenizer = tokenizer  # token texts of logprobs
        self.stop_matcher = (
            StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        )

    def on_output(self, output: RequestOutput) -> tuple[bool, bool]:
        """Queue the events for one step's output. Returns (done, stopped_by_stop_string):
        a stop-string match ends the stream before the engine knows it is finished."""
        if output.error is not None:  # refused by the core before it ran: no stream starts
            self.fail(output.error)
            return True, False
        if self.stop_matcher is not None and len(output.new_token_ids) > 1:
            return self._on_tokens_one_by_one(output)
        if self.first_scheduled_time is None and output.first_scheduled_time is not None:
            self.first_scheduled_time = output.first_scheduled_time
            self.num_cached_tokens = output.num_cached_tokens
        self.num_output_tokens += len(output.new_token_ids)
        text = ""
        if self.detokenizer is not None:
            text = self.detokenizer.step(output.new_token_ids) if output.new_token_ids else ""
            if output.finished:
                text += self.detokenizer.flush()
        stop_string = None
        if self.stop_matcher is not None:
            text, stop_string = self.stop_matcher.feed(text)
            if output.finished and stop_string is None:
                text += self.stop_matcher.flush()
        if output.new_token_ids or text:
            # Marked last when the Finished event is queued right behind it (below).
            self._deliver(output, text, stop_string is not None or output.finished)
        if stop_string is not None:
            self._put_finished(FinishReason.STOP, stop_string=stop_string)
            return True, not output.finished
        if output.finished:
            assert output.finish_reason is not None
            self._put_finished(
                output.finish_reason,
                stop_token_id=output.stop_token_id,
                message=output.finish_message,
            )
            return True, False
        return False, False

    def _on_tokens_one_by_one(self, output: RequestOutput) -> tuple[bool, bool]:
        """Several tokens in one step (speculative decoding; such requests carry no
        logprobs): a stop string may end inside them, so each token goes through the stop
        check alone and the tokens after the stop are neither delivered nor counted, as
        without speculation."""
        last = len(output.new_token_ids) - 1
        for i, token_id in enumerate(output.new_token_ids):
            part = dataclasses.replace(output, new_token_ids=[token_id])
            if i < last:
                part.finish_reason = part.stop_token_id = part.finish_message = None
            if i > 0:
                part.prompt_logprobs = None
            done, stopped = self.on_output(part)
            if done:
                return done, stopped
        return False, False

    def _deliver(self, output: RequestOutput, text: str, last: bool) -> None:
        """One step's tokens (and text) as a delta event. The offline LLM overrides it to
        keep plain token ids and the engine's own logprobs, with no event per token."""
        self.events.put_nowait(self._delta(output, text, last))

    def _delta(self, output: RequestOutput, text: str, last: bool) -> GenerationDelta:
        logprobs = prompt_logprobs = None
        if output.logprobs is not None:
            logprobs = [to_position_logprobs(e, self.tokenizer) for e in output.logprobs]  # type: ignore[arg-type]
        if output.prompt_logprobs is not None:
            prompt_logprobs = to_prompt_logprobs(output.prompt_logprobs, self.tokenizer)  # type: ignore[arg-type]
        return GenerationDelta(
            self.index,
            output.new_token_ids,
            text if self.return_text else "",
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            last=last,
        )

    def finish(self, reason: FinishReason) -> None:
        """End the stream from outside the engine (admin abort)."""
        self._put_finished(reason)

    def fail(self, error: BaseException) -> None:
        self.events.put_nowait(error)

    def _put_finished(
        self,
        reason: FinishReason,
        *,
        stop_token_id: int | None = None,
        stop_string: str | None = None,
        message: str | None = None,
    ) -> None:
        self.events.put_nowait(
            GenerationFinished(
                self.index, reason, self.num_output_tokens,
                stop_token_id=stop_token_id, stop_string=stop_string, message=message,
            )
        )

