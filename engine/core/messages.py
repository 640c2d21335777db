"""What the engine core process and the serving process say to each other (pickled over their
socket pair). Serving -> core: CoreStart once, then the commands of engine.core.loop (new
requests as CoreRequests, engine.core.core_request). Core -> serving: CoreReady or CoreFailed
once, then CoreOutputs per step, CoreKvEvents per step while KV events are on (SetKvEvents),
CoreBeat while idle, and CoreDied if the step loop fails."""
from __future__ import annotations

from dataclasses import dataclass

from engine.config import EngineConfig
from engine.core.build import ModelFacts
from engine.core.loop import CoreStats
from engine.core.outputs import RequestOutput
from engine.kv_cache.kv_events import KvEventBatch


@dataclass(frozen=True, slots=True)
class CoreStart:
    config: EngineConfig
    bos_token_id: int | None  # the warm-up request's token
    log_level: int


@dataclass(frozen=True, slots=True)
class CoreReady:
    facts: ModelFacts


@dataclass(frozen=True, slots=True)
class CoreFailed:
    """Loading failed; `reason` becomes the ModelLoadError engine-serve prints."""

    reason: str


@dataclass(frozen=True, slots=True)
class CoreOutputs:
    outputs: list[RequestOutput]
    stats: CoreStats | None  # None: sent off the step thread, no fresh numbers


@dataclass(frozen=True, slots=True)
class CoreKvEvents:
    """One step's KV-cache events (engine.kv_cache.kv_events), for Discovery/WatchKvEvents."""

    batch: KvEventBatch


@dataclass(frozen=True, slots=True)
class CoreBeat:
    stats: CoreStats


@dataclass(frozen=True, slots=True)
class CoreDied:
    reason: str
