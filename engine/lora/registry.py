"""The adapters a server offers, by served name: `--lora-modules` at start-up, plus those
loaded and unloaded at runtime (Admin/LoadLoraAdapter, POST /v1/load_lora_adapter) when
runtime updating is allowed.

Each adapter is read and checked here, in the serving process, before its name is served, so
a bad directory is the loading call's error (naming the file and field) rather than a failure
inside a step. The engine core reads it again by path when a request first needs it.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from engine.config import EngineConfig, LoRAConfig
from engine.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from engine.lora.adapter import load_adapter
from engine.lora.request import LoRARequest
from engine.models.decoder_spec import DecoderSpec


@dataclass(frozen=True, slots=True)
class ServedAdapter:
    request: LoRARequest
    parent: str  # the served base model name it adapts


class LoRARegistry:
    def __init__(self, config: LoRAConfig, spec: DecoderSpec, base_names: tuple[str, ...]) -> None:
        self.config = config
        self.spec = spec
        self.base_names = base_names
        self._ids = itertools.count(1)
        self._adapters: dict[str, ServedAdapter] = {}
        # Loads run off the event loop, possibly two at once.
        self._lock = threading.Lock()

    def load(self, name: str, path: str, base_model_name: str | None = None) -> ServedAdapter:
        """Read, check and serve the adapter at `path` as `name`. InvalidRequestError names
        the field at fault (lora_name, lora_path, base_model_name)."""
        if not name:
            raise InvalidRequestError("lora_name is required", field="lora_name")
        if not path:
            raise InvalidRequestError("lora_path is required", field="lora_path")
        if name in self.base_names:
            raise InvalidRequestError(
                f"lora_name {name!r} is the base model's name", field="lora_name")
        parent = base_model_name or self.base_names[0]
        if parent not in self.base_names:
            raise InvalidRequestError(
                f"base_model_name {parent!r} is not served here; served: "
                f"{', '.join(self.base_names)}", field="base_model_name")
        with self._lock:
            if name in self._adapters:
                raise InvalidRequestError(
                    f"LoRA adapter {name!r} is already loaded; unload it first",
                    field="lora_name", reason="ALREADY_EXISTS")
        load_adapter(path, self.spec, self.config.max_lora_rank)  # raises naming the file
        with self._lock:
            if name in self._adapters:
                raise InvalidRequestError(
                    f"LoRA adapter {name!r} is already loaded; unload it first",
                    field="lora_name", reason="ALREADY_EXISTS")
            adapter = ServedAdapter(LoRARequest(name, next(self._ids), path), parent)
            self._adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> None:
        """Stop serving `name`; requests already running with it finish with it."""
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise ModelNotFoundError(
                    f"LoRA adapter {name!r} is not loaded", field="lora_name")

    def get(self, name: str) -> LoRARequest | None:
        adapter = self._adapters.get(name)
        return adapter.request if adapter is not None else None

    def adapters(self) -> list[ServedAdapter]:
        return list(self._adapters.values())


def make_lora_registry(config: EngineConfig, base_names: tuple[str, ...]) -> LoRARegistry | None:
    """The registry of a served model with `--enable-lora`, its `--lora-modules` loaded (a bad
    one stops start-up with a ModelLoadError naming it); None without."""
    if config.lora is None:
        return None
    from transformers import AutoConfig

    from engine.models.decoder_spec import read_decoder_spec

    spec = read_decoder_spec(AutoConfig.from_pretrained(config.model.model))
    registry = LoRARegistry(config.lora, spec, base_names)
    for module in config.lora.modules:
        try:
            registry.load(module.name, module.path, module.base_model_name)
        except InvalidRequestError as exc:
            raise ModelLoadError(f"--lora-modules {module.name}: {exc.message}") from None
    return registry
