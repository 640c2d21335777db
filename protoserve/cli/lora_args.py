"""engine-serve's multi-LoRA options (`--enable-lora` and its limits), as the reference
server spells them, and the LoRAConfig they make."""
from __future__ import annotations

import argparse
import json
import os

from engine.config import LoRAConfig, LoRAModule

# The reference server's switch for runtime adapter loading, honoured as well as the flag.
RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def lora_module(text: str) -> LoRAModule:
    """`name=path`, or the JSON form {"name": ..., "path": ..., "base_model_name": ...}."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None
        if not isinstance(value, dict) or not value.get("name") or not value.get("path"):
            raise argparse.ArgumentTypeError('the JSON form needs "name" and "path"')
        unknown = set(value) - {"name", "path", "base_model_name"}
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown keys {', '.join(sorted(unknown))}")
        return LoRAModule(str(value["name"]), str(value["path"]),
                          value.get("base_model_name") or None)
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path or a JSON object, got {text!r}")
    return LoRAModule(name, path)


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters (PEFT directories) under model names of their "
                   "own, applied per request in shared batches")
    g.add_argument("--lora-modules", nargs="+", type=lora_module, default=None,
                   metavar="NAME=PATH|JSON",
                   help='adapters served from start-up: name=path, or {"name": ..., "path": '
                   '..., "base_model_name": ...} (default: none)')
    g.add_argument("--max-loras", type=int, default=1,
                   help="most distinct adapters one step runs (their weights resident at once; "
                   "default: 1)")
    g.add_argument("--max-lora-rank", type=int, default=16,
                   help="largest adapter rank accepted (default: 16)")
    g.add_argument("--max-cpu-loras", type=int, default=None,
                   help="loaded adapters kept in host memory, least recently used dropped "
                   "first (default: --max-loras)")
    g.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="allow loading and unloading adapters while serving (POST "
                   f"/v1/load_lora_adapter, Admin/LoadLoraAdapter); {RUNTIME_UPDATING_ENV}=True "
                   "does the same")


def lora_config_from_args(args: argparse.Namespace) -> LoRAConfig | None:
    """None without --enable-lora; ValueError (one line) for options that need it."""
    if not args.enable_lora:
        if args.lora_modules:
            raise ValueError("--lora-modules needs --enable-lora")
        return None
    runtime = args.allow_runtime_lora_updating or os.environ.get(
        RUNTIME_UPDATING_ENV, "").strip().lower() in ("1", "true")
    return LoRAConfig(
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        modules=tuple(args.lora_modules or ()),
        allow_runtime_updating=runtime,
    )
