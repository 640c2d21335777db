"""Schemathesis' CLI against a running bridge, with every default check (status codes, content
types, headers, response schemas, negative-data rejection, positive-data acceptance, no 5xx)
and all its phases (examples, coverage, fuzzing, stateful). Shared by the fuzz-tier test and
benchmarks/fuzz_long_run.py; openapi_fuzz_hooks.py keeps positive cases within the rules the
document cannot state."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from protoserve.v1 import discovery_pb2, discovery_pb2_grpc

HOOKS = Path(__file__).with_name("openapi_fuzz_hooks.py")
_CLI = "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())"


@dataclass(frozen=True)
class ServedModel:
    vocab_size: int
    max_model_len: int


def served_model(grpc_address: str) -> ServedModel:
    """The facts the hooks need, from the engine's Discovery service: the smallest of every
    served model's (an unnamed pooling call goes to an `--embedding-model`)."""
    with grpc.insecure_channel(grpc_address) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).ListModels(
            discovery_pb2.ListModelsRequest(), timeout=10)
    return ServedModel(vocab_size=min(info.vocab_size for info in reply.models),
                       max_model_len=min(info.max_model_len for info in reply.models))


def run_schemathesis(url: str, model: ServedModel, *, max_examples: int, seed: int,
                     timeout: float, status_log: Path | None = None,
                     ) -> subprocess.CompletedProcess[str]:
    """One `schemathesis run` over every operation; exit status 0 means every check passed.

    filter_too_much is a generation health check, not a response check: a path parameter
    that is any string (a model name) has no negative values to generate. The failure cache
    is off: it would replay an earlier run's cases (kept in the working directory) first."""
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS),
           "PROTOSERVE_FUZZ_VOCAB_SIZE": str(model.vocab_size),
           "PROTOSERVE_FUZZ_MAX_MODEL_LEN": str(model.max_model_len)}
    if status_log is not None:
        env["PROTOSERVE_FUZZ_STATUS_LOG"] = str(status_log)
    with tempfile.TemporaryDirectory(prefix="schemathesis-") as folder:
        config = Path(folder, "schemathesis.toml")
        config.write_text("[cache]\nenabled = false\n", encoding="utf-8")
        command = [sys.executable, "-c", _CLI, "--config-file", str(config), "run",
                   f"{url}/openapi.json",
                   "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1",
                   "--request-timeout", "60", "--suppress-health-check", "filter_too_much",
                   "--continue-on-failure", "--no-color", "--output-sanitize", "false"]
        return subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=folder)
