"""Which adapter a request runs with: plain data that crosses the engine core's process
boundary with the request (pickled in its CoreRequest)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    # The served model name clients select it by.
    name: str
    # Unique per registration in the serving process, never reused: an adapter unloaded and
    # loaded again under the same name gets a new id, so neither the runner's cache of loaded
    # adapters nor the prefix cache can serve the old weights for it.
    lora_id: int
    # The PEFT directory (adapter_config.json + adapter_model.safetensors).
    path: str
