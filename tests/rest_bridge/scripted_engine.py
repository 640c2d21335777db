"""A scripted protoserve.v1 engine: a real grpc.aio server on 127.0.0.1 whose answers are
decided by the prompt, for bridge tests of what a real model cannot be made to do on demand
(mid-stream failures, rich error details of every status, logprobs, slow streams to cancel).

Scripts (the text prompt, or the last chat message's text):
  "error:<CODE>[:<field>[:<reason>]]"  abort before `started` with that status and details
  "fail-after:<k>"                     send `started` and k deltas, then abort with INTERNAL
  "hang"                               send `started` and one delta, then wait to be cancelled
  "say:<text>"                         stream <text> in 3-character deltas, then finish (stop);
                                       a request with `parsing` gets the engine's own parsed
                                       fields (engine.server.parsed_output), as a real engine
  anything else                        `max_tokens` (default 4) deltas " w0", " w1", ... per
                                       choice; a stop string equal to a word ends the choice
                                       (a finish with no delta, as an abort's); the choices'
                                       last deltas all come before their Finished events
As the engine does, a delta whose token ended its choice is marked `last`.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from engine.core.request import FinishReason
from engine.generation import GenerationDelta, GenerationFinished, GenerationStarted
from engine.server.parsed_output import ParsedOutputWriter, parsing_plan_of
from engine.server.request_tracker import ServingOptions
from protoserve.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

MODEL_ID = "scripted-model"
MODEL_ALIAS = "scripted-alias"
DEFAULT_MAX_TOKENS = 4
FIRST_TOKEN_ID = 100
Response = inference_pb2.GenerateResponse


@dataclass
class ReceivedCall:
    request: inference_pb2.GenerateRequest
    metadata: dict[str, str]


@dataclass
class EngineRecord:
    """What the engine saw; written by the server thread, read by tests."""

    calls: list[ReceivedCall] = field(default_factory=list)
    cancelled_request_ids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls_snapshot(self) -> list[ReceivedCall]:
        with self.lock:
            return list(self.calls)

    def cancelled_snapshot(self) -> list[str]:
        with self.lock:
            return list(self.cancelled_request_ids)


def script_of(request: inference_pb2.GenerateRequest) -> str:
    if request.WhichOneof("input") == "text":
        return request.text
    if request.WhichOneof("input") == "chat" and request.chat.messages:
        return request.chat.messages[-1].text
    return ""


def _packed(detail: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def rich_status_trailer(
    code: grpc.StatusCode, message: str, field_name: str, reason: str
) -> tuple[tuple[str, bytes], ...]:
    """The `grpc-status-details-bin` trailer with ErrorInfo and BadRequest, as the engine
    attaches them."""
    details = []
    if reason:
        details.append(_packed(error_details_pb2.ErrorInfo(reason=reason, domain="scripted")))
    if field_name:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field_name, description=message)
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=details)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def _delta(index: int, step: int, sampling: common_pb2.SamplingParams, last: bool) -> Response:
    token_id = FIRST_TOKEN_ID + step
    delta = inference_pb2.GenerateDelta(index=index, token_ids=[token_id], text=f" w{step}",
                                        last=last)
    if sampling.HasField("logprobs"):
        chosen = inference_pb2.TokenLogprob(
            token_id=token_id, logprob=-0.5, token=f" w{step}", rank=1)
        top = [
            inference_pb2.TokenLogprob(
                token_id=token_id + k, logprob=-0.5 - k, token=f" alt{k}", rank=k + 1)
            for k in range(sampling.logprobs)
        ]
        delta.logprobs.append(inference_pb2.TokenLogprobs(chosen=chosen, top=top))
    return Response(delta=delta)


class ScriptedInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, record: EngineRecord) -> None:
        self.record = record

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        with self.record.lock:
            self.record.calls.append(ReceivedCall(request, metadata))
        script = script_of(request)
        if script.startswith("error:"):
            code_name, _, rest = script.removeprefix("error:").partition(":")
            field_name, _, reason = rest.partition(":")
            code = grpc.StatusCode[code_name]
            message = f"scripted {code_name}"
            await context.abort(
                code, message, rich_status_trailer(code, message, field_name, reason))
        prompt_tokens = len(script.split()) or 1
        try:
            yield Response(started=inference_pb2.GenerateStarted(
                request_id=request.request_id, prompt_tokens=prompt_tokens, cached_tokens=1,
                prompt_text=f"<rendered>{script}"))
            async for event in self._generate(request, script, context, prompt_tokens):
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            # CancelledError when the cancellation lands at one of our awaits; GeneratorExit
            # when it lands inside grpc's write of a message we yielded (the handler task is
            # cancelled there and this generator is closed at its `yield`).
            with self.record.lock:
                self.record.cancelled_request_ids.append(request.request_id)
            raise

    async def _generate(
        self,
        request: inference_pb2.GenerateRequest,
        script: str,
        context: grpc.aio.ServicerContext,
        prompt_tokens: int,
    ) -> AsyncIterator[Response]:
        sampling = request.sampling
        choices = sampling.n if sampling.HasField("n") else 1
        max_tokens = (
            sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS)
        if script == "hang":
            yield _delta(0, 0, sampling, last=False)
            await asyncio.sleep(3600)
        if script.startswith("say:"):
            # Exact output text on demand (tool-call markup a random model never writes).
            text = script.removeprefix("say:")
            pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
            plan = parsing_plan_of(request, ServingOptions())
            writer = ParsedOutputWriter(plan) if plan is not None else None
            if writer is not None:
                writer.responses(GenerationStarted(request.request_id, [], f"<rendered>{script}",
                                                   0), Response())
            for index in range(choices):
                for number, piece in enumerate(pieces):
                    last = number == len(pieces) - 1
                    response = Response(delta=inference_pb2.GenerateDelta(
                        index=index, token_ids=[FIRST_TOKEN_ID + number], text=piece, last=last))
                    event = GenerationDelta(index, [FIRST_TOKEN_ID + number], piece, last=last)
                    for message in writer.responses(event, response) if writer else [response]:
                        yield message
                response = Response(finished=inference_pb2.GenerateFinished(
                    index=index, reason=inference_pb2.FINISH_REASON_STOP,
                    completion_tokens=len(pieces)))
                event = GenerationFinished(index, FinishReason.STOP, len(pieces))
                for message in writer.responses(event, response) if writer else [response]:
                    yield message
            yield Response(usage=common_pb2.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=len(pieces) * choices))
            return
        fail_after = (
            int(script.removeprefix("fail-after:")) if script.startswith("fail-after:") else None)
        stopped: set[int] = set()
        produced = 0
        for step in range(max_tokens):
            if step == fail_after:
                await context.abort(grpc.StatusCode.INTERNAL, "scripted failure")
            for index in sorted(set(range(choices)) - stopped):
                word = f"w{step}"
                if word in sampling.stop:
                    stopped.add(index)
                    yield Response(finished=inference_pb2.GenerateFinished(
                        index=index, reason=inference_pb2.FINISH_REASON_STOP,
                        stop_string=word, completion_tokens=step))
                    continue
                produced += 1
                yield _delta(index, step, sampling, last=step == max_tokens - 1)
            await asyncio.sleep(0)
        for index in sorted(set(range(choices)) - stopped):
            yield Response(finished=inference_pb2.GenerateFinished(
                index=index, reason=inference_pb2.FINISH_REASON_LENGTH,
                completion_tokens=max_tokens))
        yield Response(usage=common_pb2.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=produced, cached_tokens=1))


class ScriptedDiscovery(discovery_pb2_grpc.DiscoveryServicer):
    async def ListModels(
        self, request: discovery_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.ListModelsResponse:
        model = discovery_pb2.ModelInfo(
            id=MODEL_ID, aliases=[MODEL_ALIAS], root="/models/scripted", max_model_len=128,
            created=1_700_000_000)
        return discovery_pb2.ListModelsResponse(models=[model])


class ScriptedTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    async def Detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.DetokenizeResponse:
        return tokenizer_pb2.DetokenizeResponse(
            text=" ".join(f"t{token_id}" for token_id in request.token_ids))


class ScriptedEngine:
    """Runs the scripted services on their own event loop in a background thread."""

    def __init__(self) -> None:
        self.record = EngineRecord()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return f"127.0.0.1:{self.port}"

    async def _start(self) -> None:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(ScriptedInference(self.record), server)
        discovery_pb2_grpc.add_DiscoveryServicer_to_server(ScriptedDiscovery(), server)
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(ScriptedTokenizer(), server)
        health = HealthServicer()
        await health.set("protoserve.v1.Inference", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            stopping = asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop)
            stopping.result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
