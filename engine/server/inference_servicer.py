"""protoserve.v1.Inference: Generate (server streaming), Embed, Score and Classify."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import ExitStack, aclosing
from dataclasses import replace

import grpc

from engine.errors import InvalidRequestError, QueueFullError
from engine.frontend.best_of import select_best_of
from engine.frontend.beam_search_driver import beam_search
from engine.generation import GenerationEvent, GenerationFinished, GenerationStarted
from engine.server.admission import embed_cost, generate_cost
from engine.server.context import REQUEST_ID_KEY, EngineHandle, abort_for, request_id_from
from engine.server.embed_convert import embed, embedding_request_from_pb
from engine.server.parsed_output import ParsedOutputWriter, parsing_plan_of, with_parsing
from engine.server.proto_convert import event_to_pb, generate_request_from_pb
from engine.server.render_convert import render
from engine.server.score_convert import (
    check_text_bytes,
    classify,
    classify_request_from_pb,
    score,
    score_cost,
    score_request_from_pb,
)
from engine.server.request_defaults import with_server_defaults
from engine.server.request_tracker import PROMPT_BYTES_PER_TOKEN, RequestTracker, outcome_of
from engine.server.stall_guard import StallGuard
from protoserve.tracing import TRACEPARENT, span_trace_id, start_span, trace_headers, trace_id_of
from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

GENERATE_SPAN = "protoserve.generate"


def request_trace(context: grpc.aio.ServicerContext, tracer) -> dict:
    """The caller's trace id for the request log line (always, from `traceparent` metadata)
    and, when tracing is configured, a span that is a child of the caller's span."""
    carrier = trace_headers(context.invocation_metadata() or ())
    if tracer is None:
        return {"trace_id": trace_id_of(carrier.get(TRACEPARENT))}
    span = start_span(tracer, GENERATE_SPAN, carrier)
    return {"trace_id": span_trace_id(span), "span": span}


async def counting_completion_tokens(
    events: AsyncIterator[GenerationEvent], usage: common_pb2.Usage
) -> AsyncIterator[GenerationEvent]:
    """`events` unchanged; each choice's output tokens are added to `usage` as it finishes."""
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, GenerationFinished):
                usage.completion_tokens += event.num_output_tokens
            yield event


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, handle: EngineHandle) -> None:
        self.handle = handle

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # Written with context.write (not `yield`) so a client that stops reading can be timed
        # out: each write waits for HTTP/2 flow control, and a stalled one is abandoned.
        try:
            request_id = request_id_from(context, request.request_id)
        except InvalidRequestError as error:
            await abort_for(context, error)
            return
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        usage = common_pb2.Usage()
        options = self.handle.options
        preview = request.text if options.max_log_len > 0 else ""
        tracker = RequestTracker(
            request_id, self.handle.metrics, options, preview,
            n=request.sampling.n if request.sampling.HasField("n") else 1,
            best_of=request.sampling.best_of if request.sampling.HasField("best_of") else None,
            **request_trace(context, self.handle.tracer),
        )
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        # A little before gRPC's own expiry, so the engine's DEADLINE path (abort with reason
        # DEADLINE, DEADLINE_EXCEEDED with details) wins the race against the transport cancel.
        deadline = loop.time() + max(remaining - 0.05, 0.0) if remaining is not None else None
        # Outermost, so the request's memory reservation is returned on every way out:
        # success, client cancel, deadline, engine abort, error (abort_for raises too).
        with ExitStack() as reservation:
            await self._generate(request, context, request_id, tracker, usage, deadline,
                                 reservation)

    async def _generate(self, request: inference_pb2.GenerateRequest,
                        context: grpc.aio.ServicerContext, request_id: str,
                        tracker: RequestTracker, usage: common_pb2.Usage,
                        deadline: float | None, reservation: ExitStack) -> None:
        loop = asyncio.get_running_loop()
        options = self.handle.options
        try:
            engine = self.handle.get(request.model, task="generate")
            self._check_size(engine, request)
            self._admit(engine)
            config = engine.config
            reservation.enter_context(self.handle.request_memory.admitted(
                generate_cost(request, engine.model.max_model_len, config.model.max_logprobs,
                              _default_max_tokens(config)),
                options.max_request_memory))
            generation = with_server_defaults(
                generate_request_from_pb(request, request_id), request.sampling, engine)
            if (lora := engine.lora_for(request.model)) is not None:
                generation = replace(generation, lora=lora)
            writer = None
            if (plan := parsing_plan_of(request, options)) is not None:
                generation = with_parsing(generation, request, plan, engine.tokenizer)
                writer = ParsedOutputWriter(plan)
            # Usage counts every token generated: all best_of candidates, also the ones not
            # returned (as OpenAI bills them), and for beam search the beams returned.
            if generation.sampling_params.use_beam_search:
                best = counting_completion_tokens(
                    beam_search(engine.loop, generation, deadline), usage
                )
            else:
                candidates = engine.loop.generate(generation, deadline)
                best = select_best_of(
                    counting_completion_tokens(candidates, usage), generation.sampling_params
                )
            stream = StallGuard(context, options.stall_timeout_s)
            try:
                async with aclosing(best) as events:
                    async for event in events:
                        tracker.on_event(event)
                        if isinstance(event, GenerationStarted):
                            usage.prompt_tokens = len(event.prompt_token_ids)
                            usage.cached_tokens = event.num_cached_tokens
                        response = event_to_pb(event, request.return_prompt_token_ids)
                        for message in (writer.responses(event, response) if writer
                                        else (response,)):
                            await stream.write(message)
                await stream.write(inference_pb2.GenerateResponse(usage=usage))
            finally:
                stream.close()
        except asyncio.CancelledError as cancel:
            tracker.finish(outcome_of(cancel, deadline is not None and loop.time() >= deadline))
            raise
        except Exception as error:  # noqa: BLE001 - EngineErrors mapped, the rest INTERNAL
            tracker.finish(outcome_of(error, False))
            await abort_for(context, error, request_id)
            return
        tracker.finish()

    async def Render(
        self, request: inference_pb2.RenderRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.RenderResponse | None:
        """Generate's reading of the request (same checks, same errors), nothing scheduled."""
        generate = request.request
        try:
            request_id = request_id_from(context, generate.request_id)
            engine = self.handle.get(generate.model, task="generate")
            self._check_size(engine, generate)
            return await render(generate, request_id, engine, self.handle.options)
        except Exception as error:  # noqa: BLE001 - EngineErrors mapped, the rest INTERNAL
            await abort_for(context, error)
            return None

    def _check_size(self, engine, request: inference_pb2.GenerateRequest) -> None:
        """Costs that scale with a request field are bounded before anything is spent on it:
        the number of choices, and the prompt's size before it is tokenized."""
        options = self.handle.options
        sampling = request.sampling
        for name in ("n", "best_of"):
            if sampling.HasField(name) and getattr(sampling, name) > options.max_n:
                raise InvalidRequestError(
                    f"{name} ({getattr(sampling, name)}) exceeds the server limit of "
                    f"{options.max_n} (--max-n)", field=name)
        _check_prompt_bytes(request, options.max_prompt_bytes, engine.model.max_model_len)

    def _admit(self, engine) -> None:
        """Back-pressure: refuse at once, with a retry hint, when the admission queue is full
        (the request-memory budget, engine.server.admission, refuses the same way)."""
        limit = self.handle.options.max_queue_len
        waiting = engine.loop.num_waiting
        if limit is not None and waiting >= limit:
            raise QueueFullError(
                f"{waiting} requests are waiting for a slot (max queue length {limit}); "
                "retry later"
            )

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        try:
            request_id = request_id_from(context, request.request_id)
        except InvalidRequestError as error:
            await abort_for(context, error)
            raise  # unreachable: abort raises
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(remaining - 0.05, 0.0) if remaining is not None else None
        try:
            engine = self._pooling_engine(request.model)
            for item in request.inputs:
                _check_prompt_bytes(item, self.handle.options.max_prompt_bytes,
                                    engine.model.max_model_len, "inputs")
            self._admit(engine)
            with self.handle.request_memory.admitted(
                    embed_cost(request, engine.model.max_model_len),
                    self.handle.options.max_request_memory):
                return await embed(engine, embedding_request_from_pb(request, request_id),
                                   deadline)
        except Exception as error:  # noqa: BLE001 - EngineErrors mapped, the rest INTERNAL
            await abort_for(context, error, request_id)
            raise  # unreachable: abort raises

    async def Score(
        self, request: inference_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ScoreResponse:
        request_id, deadline = await self._pooling_call(request, context)
        try:
            engine = self._pooling_engine(request.model)
            check_text_bytes(request, self.handle.options.max_prompt_bytes,
                             engine.model.max_model_len)
            self._admit(engine)
            with self.handle.request_memory.admitted(
                    score_cost(request), self.handle.options.max_request_memory):
                return await score(engine, score_request_from_pb(request, request_id), deadline)
        except Exception as error:  # noqa: BLE001 - EngineErrors mapped, the rest INTERNAL
            await abort_for(context, error, request_id)
            raise  # unreachable: abort raises

    async def Classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ClassifyResponse:
        request_id, deadline = await self._pooling_call(request, context)
        try:
            engine = self._pooling_engine(request.model)
            for item in request.inputs:
                _check_prompt_bytes(item, self.handle.options.max_prompt_bytes,
                                    engine.model.max_model_len, "inputs")
            self._admit(engine)
            cost = embed_cost(inference_pb2.EmbedRequest(inputs=request.inputs),
                              engine.model.max_model_len)
            with self.handle.request_memory.admitted(
                    cost, self.handle.options.max_request_memory):
                return await classify(engine, classify_request_from_pb(request, request_id),
                                      deadline)
        except Exception as error:  # noqa: BLE001 - EngineErrors mapped, the rest INTERNAL
            await abort_for(context, error, request_id)
            raise  # unreachable: abort raises

    def _pooling_engine(self, model: str):
        """The engine for a pooling call (Embed, Score, Classify) naming `model`. Pooling runs
        the base model only, so an adapter's name is refused rather than silently served
        without its adapter."""
        engine = self.handle.get(model, task="embed")
        if engine.lora_for(model) is not None:
            raise InvalidRequestError(
                f"model {model!r} is a LoRA adapter; adapters serve generation only, use the "
                "base model", field="model")
        return engine

    @staticmethod
    async def _pooling_call(
        request, context: grpc.aio.ServicerContext
    ) -> tuple[str, float | None]:
        """The request id and the loop-time deadline of a unary pooling call."""
        try:
            request_id = request_id_from(context, request.request_id)
        except InvalidRequestError as error:
            await abort_for(context, error)
            raise  # unreachable: abort raises
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(remaining - 0.05, 0.0) if remaining is not None else None
        return request_id, deadline


def _check_prompt_bytes(message, limit: int | None, max_model_len: int,
                        field: str = "prompt") -> None:
    """A prompt (a message with the `input` oneof: text, token ids or chat) over the byte limit
    is refused before tokenizing it costs anything. Media parts do not count: they become no
    text tokens here, and the bridge bounds their size (--max-media-bytes)."""
    if limit is None:
        limit = PROMPT_BYTES_PER_TOKEN * max_model_len
    which = message.WhichOneof("input")
    if which == "text":
        size = len(message.text.encode())
    elif which == "chat":
        size = message.chat.ByteSize() - sum(
            part.ByteSize() for chat_message in message.chat.messages
            if chat_message.WhichOneof("content") == "parts"
            for part in chat_message.parts.parts if part.WhichOneof("part") not in _TEXT_PARTS)
    else:
        size = message.token_ids.ByteSize() if which else 0
    if size > limit:
        raise InvalidRequestError(
            f"the prompt is {size} bytes; at most {limit} are accepted (--max-prompt-bytes)",
            field=field)


_TEXT_PARTS = ("text", "refusal")


def _default_max_tokens(config) -> int | None:
    """The model's max_tokens default (generation_config), which an unset max_tokens gets."""
    value = dict(config.generation_defaults).get("max_tokens")
    return int(value) if value else None
