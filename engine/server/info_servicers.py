"""protoserve.v1.Tokenizer, Discovery and Admin: small unary services over the engine."""
from __future__ import annotations

import grpc

from engine.errors import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    FailedPreconditionError,
)

import protoserve
from engine.frontend.served_model import Engine
from engine.kv_cache.kv_events import BlockRemoved, BlockStored, KvEventBatch
from engine.lora.registry import LoRARegistry
from engine.output_parsing import REASONING_PARSERS, TOOL_PARSERS
from engine.server.context import EngineHandle, abort_for
from engine.server.proto_convert import chat_from_pb
from engine.server.request_tracker import load_snapshot
from protoserve.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    discovery_pb2,
    discovery_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, handle: EngineHandle) -> None:
        self.handle = handle

    async def Tokenize(self, request, context: grpc.aio.ServicerContext):
        try:
            engine = self.handle.get(request.model)
            tokenizer = engine.tokenizer
            is_chat = request.WhichOneof("input") == "chat"
            add_special = (
                request.add_special_tokens if request.HasField("add_special_tokens") else not is_chat
            )
            text = await engine.loop.off_loop(_render, engine, request.chat) if is_chat else (
                request.text)
            token_ids = await engine.loop.off_loop(
                lambda: tokenizer.encode(text, add_special_tokens=add_special))
            response = tokenizer_pb2.TokenizeResponse(
                token_ids=token_ids, count=len(token_ids), max_model_len=engine.model.max_model_len
            )
            if request.return_token_strs:
                response.token_strs.extend(tokenizer.convert_ids_to_tokens(token_ids))
            return response
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)

    async def Detokenize(self, request, context: grpc.aio.ServicerContext):
        try:
            engine = self.handle.get(request.model)
            bad = [t for t in request.token_ids if not 0 <= t < engine.model.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token id {bad[0]} is outside the vocabulary", field="token_ids"
                )
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            text = engine.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)
            return tokenizer_pb2.DetokenizeResponse(text=text)
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)

    async def RenderChat(self, request, context: grpc.aio.ServicerContext):
        try:
            engine = self.handle.get(request.model)
            prompt = await engine.loop.off_loop(_render, engine, request.chat)
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else False
            token_ids = await engine.loop.off_loop(
                lambda: engine.tokenizer.encode(prompt, add_special_tokens=add_special))
            return tokenizer_pb2.RenderChatResponse(prompt=prompt, token_ids=token_ids)
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)


def _render(engine: Engine, chat_pb) -> str:
    return engine.tokenizer.render_chat_prompt(chat_from_pb(chat_pb))


def model_info(engine: Engine) -> discovery_pb2.ModelInfo:
    m = engine.model
    info = discovery_pb2.ModelInfo(
        id=m.names[0],
        aliases=list(m.names[1:]),
        root=m.root,
        max_model_len=m.max_model_len,
        vocab_size=m.vocab_size,
        eos_token_ids=sorted(m.eos_token_ids),
        architecture=m.architecture,
        task=(
            discovery_pb2.MODEL_TASK_EMBED if m.task == "embed" else discovery_pb2.MODEL_TASK_GENERATE
        ),
        dtype=m.dtype,
        block_size=m.block_size,
        num_kv_blocks=m.num_blocks,
        has_chat_template=m.has_chat_template,
        created=m.created,
        sampling_defaults={name: float(value)
                           for name, value in engine.config.generation_defaults},
    )
    if m.bos_token_id is not None:
        info.bos_token_id = m.bos_token_id
    return info


def adapter_infos(engine: Engine, name: str | None = None) -> list[discovery_pb2.ModelInfo]:
    """One ModelInfo per served LoRA adapter (only `name`'s when given): the base model's,
    with the adapter's name, directory and parent."""
    if engine.loras is None:
        return []
    base = model_info(engine)
    infos = []
    for adapter in engine.loras.adapters():
        if name is not None and adapter.request.name != name:
            continue
        info = discovery_pb2.ModelInfo()
        info.CopyFrom(base)
        info.id, info.root, info.parent = adapter.request.name, adapter.request.path, adapter.parent
        del info.aliases[:]
        infos.append(info)
    return infos


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServicer):
    def __init__(self, handle: EngineHandle) -> None:
        self.handle = handle

    async def GetModelInfo(self, request, context: grpc.aio.ServicerContext):
        try:
            engine = self.handle.get(request.model)
            adapters = adapter_infos(engine, request.model) if request.model else []
            info = adapters[0] if adapters else model_info(engine)
            return discovery_pb2.GetModelInfoResponse(info=info)
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)

    async def ListModels(self, request, context: grpc.aio.ServicerContext):
        try:
            self.handle.get()  # UNAVAILABLE while loading or draining
            return discovery_pb2.ListModelsResponse(
                models=[info for engine in self.handle.engines
                        for info in (model_info(engine), *adapter_infos(engine))]
            )
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)

    async def GetServerInfo(self, request, context: grpc.aio.ServicerContext):
        options = self.handle.options
        return discovery_pb2.GetServerInfoResponse(
            version=protoserve.__version__,
            reasoning_parsers=REASONING_PARSERS, tool_parsers=sorted(TOOL_PARSERS),
            default_reasoning_parser=options.reasoning_parser,
            default_tool_parser=options.auto_tool_parser)

    async def GetLoad(self, request, context: grpc.aio.ServicerContext):
        # Answers while draining too (routers watch the drain); UNAVAILABLE only before load.
        engine = self.handle.engine
        if engine is None:
            await abort_for(context, EngineUnavailableError("the model is still loading"))
        load = load_snapshot(engine)
        stats = engine.loop.stats()
        return discovery_pb2.GetLoadResponse(
            num_requests_running=load.num_requests_running,
            num_requests_waiting=load.num_requests_waiting,
            kv_cache_usage=load.kv_cache_usage,
            num_free_kv_blocks=stats.num_free_kv_blocks,
            num_kv_blocks=stats.num_kv_blocks,
            prefix_cache_hit_rate=load.prefix_cache_hit_rate,
            num_preemptions=load.num_preemptions,
            draining=self.handle.draining,
            num_streams=engine.loop.num_streams,
            num_prefix_cache_queried_tokens=load.num_queried_tokens,
            num_prefix_cache_hit_tokens=load.num_hit_tokens,
            running_lora_adapters=load.running_lora_adapters,
            waiting_lora_adapters=load.waiting_lora_adapters,
            max_lora=load.max_lora,
        )

    async def WatchKvEvents(self, request, context: grpc.aio.ServicerContext):
        try:
            engine = self.handle.get(request.model, task="generate")
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)
        hub = engine.loop.kv_events
        options = self.handle.options
        hub.keep_for_replay(options.kv_events_replay_batches)
        since = (request.since_sequence_number if request.HasField("since_sequence_number")
                 else None)
        try:
            watcher = hub.subscribe(options.kv_events_max_pending, since)
        except EngineError as error:
            await abort_for(context, error)
        try:
            # Headers go out once recording is requested: commands reach the core in order,
            # so a client that waits for them sees the blocks of every later request.
            await context.send_initial_metadata(())
            while True:
                yield kv_event_batch_to_pb(await watcher.next_batch())
        except EngineError as error:
            await abort_for(context, error)
        finally:
            hub.unsubscribe(watcher)


def kv_event_batch_to_pb(batch: KvEventBatch) -> discovery_pb2.WatchKvEventsResponse:
    events = []
    for event in batch.events:
        if isinstance(event, BlockStored):
            stored = discovery_pb2.BlockStored(
                block_hashes=event.block_hashes, token_ids=event.token_ids,
                block_size=event.block_size, lora_name=event.lora_name)
            if event.parent_block_hash is not None:
                stored.parent_block_hash = event.parent_block_hash
            events.append(discovery_pb2.KvEvent(block_stored=stored))
        elif isinstance(event, BlockRemoved):
            events.append(discovery_pb2.KvEvent(
                block_removed=discovery_pb2.BlockRemoved(block_hashes=event.block_hashes)))
        else:
            events.append(discovery_pb2.KvEvent(
                all_blocks_cleared=discovery_pb2.AllBlocksCleared()))
    return discovery_pb2.WatchKvEventsResponse(
        sequence_number=batch.sequence_number, timestamp=batch.timestamp, events=events)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, handle: EngineHandle) -> None:
        self.handle = handle

    async def Abort(self, request, context: grpc.aio.ServicerContext):
        try:
            # Aborts stay allowed while draining: operators end stuck requests that way.
            engine = self.handle.engine if self.handle.draining else None
            engine = engine or self.handle.get()
            aborted = engine.loop.abort_by_client_id(list(request.request_ids))
            return admin_pb2.AbortResponse(aborted_request_ids=sorted(set(aborted)))
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)

    async def Drain(self, request, context: grpc.aio.ServicerContext):
        """Same path as SIGTERM: engine-serve waits on the event, drains, then exits."""
        engine = self.handle.engine
        self.handle.shutdown_requested.set()
        return admin_pb2.DrainResponse(num_in_flight=engine.loop.num_streams if engine else 0)

    async def ResetPrefixCache(self, request, context: grpc.aio.ServicerContext):
        try:
            self.handle.get(task="generate").loop.reset_prefix_cache()
            return admin_pb2.ResetPrefixCacheResponse()
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)

    async def LoadLoraAdapter(self, request, context: grpc.aio.ServicerContext):
        try:
            engine = self.handle.get()
            registry = _runtime_lora_registry(engine)
            # Reads the adapter's weights to check them: off the event loop.
            await engine.loop.off_loop(
                registry.load, request.lora_name, request.lora_path, request.base_model_name or None
            )
            return admin_pb2.LoadLoraAdapterResponse()
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)

    async def UnloadLoraAdapter(self, request, context: grpc.aio.ServicerContext):
        try:
            _runtime_lora_registry(self.handle.get()).unload(request.lora_name)
            return admin_pb2.UnloadLoraAdapterResponse()
        except Exception as error:  # noqa: BLE001
            await abort_for(context, error)


def _runtime_lora_registry(engine: Engine) -> LoRARegistry:
    if engine.loras is None:
        raise FailedPreconditionError("LoRA is not enabled on this server (start it with --enable-lora)",
                               reason="LORA_DISABLED")
    if not engine.loras.config.allow_runtime_updating:
        raise FailedPreconditionError(
            "loading and unloading LoRA adapters at runtime is off: start the server with "
            "--allow-runtime-lora-updating (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
            reason="LORA_RUNTIME_UPDATING_DISABLED")
    return engine.loras
