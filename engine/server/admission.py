"""Admission against a host-memory budget (--max-request-memory).

Every field cap (--max-n, --max-prompt-bytes, max_tokens within the context) bounds one
request, but many requests inside the caps still add up: the choices, detokenizers, token
lists and logprob entries each in-flight request holds grow with its fields. Each request's
cost is estimated from those fields before it is accepted, the sum over the requests in flight
stays under the budget, and a request's share is returned when it ends, however it ends.

    alone over the budget       -> INVALID_ARGUMENT / 400 naming the field that drives it
    fits alone, not now         -> RESOURCE_EXHAUSTED / 429 + Retry-After, as --max-queue-len
                                   (refused at once, not queued: a waiting request would hold
                                   its connection and its own memory while it waits)

The per-unit constants come from benchmarks/request_memory.py (tracemalloc, the tiny Llama,
the core on a thread of the same process so both halves of a request are seen; three runs on
the 2-core dev machine). Each is the largest measured value, rounded up: the peak of a request
varies with how many events queue between the step thread and the event loop. They cover the
serving process and the engine core process together (with `--engine-core process` the core's
half lives in the other process), so the budget bounds the host's total, not one process's.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from engine.errors import InvalidRequestError, QueueFullError
from protoserve.v1 import common_pb2, inference_pb2

# Measured (benchmarks/request_memory.py, peak bytes; runs gave): 10.8-11.3 KB per request
# (request objects, stream state, protobuf events)
REQUEST_BYTES = 12 * 1024
# 2.9-6.3 KB per choice (n, best_of candidates or beams: Request, stream, detokenizer in
# both processes; the n=6818742 case measured 2.2 + 1.6 KB)
CHOICE_BYTES = 6400
# 25-29 B per output token of each choice (token id lists in both processes, text deltas)
OUTPUT_TOKEN_BYTES = 32
# 4-28 B per logprob entry (top_logprobs + the sampled token, per output token and choice);
# mostly events in flight, since streamed entries are not kept
LOGPROB_ENTRY_BYTES = 32
# 34-36 B per prompt token (prompt ids held by the request and the stream)
PROMPT_TOKEN_BYTES = 40
# 115-206 B per prompt logprob entry (prompt_logprobs + 1 per prompt token, held until the
# first event is sent)
PROMPT_LOGPROB_ENTRY_BYTES = 208
# 3.4-3.6 KB per embedding input and 38-70 B per token of each input
EMBED_INPUT_BYTES = 3700
EMBED_TOKEN_BYTES = 72

DEFAULT_MAX_REQUEST_MEMORY = 2 * 1024**3


def default_max_request_memory() -> int:
    """2 GiB, or half the memory available at start-up when that is less: the requests'
    state comes on top of the model and the KV cache, which are sized at start-up."""
    available = _available_memory()
    return min(DEFAULT_MAX_REQUEST_MEMORY, available // 2) if available else \
        DEFAULT_MAX_REQUEST_MEMORY


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


@dataclass(frozen=True, slots=True)
class RequestCost:
    """A request's estimated host memory, split by the fields that drive each part, so a
    refusal can name the one to lower."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return REQUEST_BYTES + sum(self.parts.values())

    @property
    def driving_field(self) -> str:
        return max(self.parts, key=lambda name: self.parts[name])


def generate_cost(request: inference_pb2.GenerateRequest, max_model_len: int,
                  max_logprobs: int, default_max_tokens: int | None = None) -> RequestCost:
    """Before tokenizing: the prompt counts one token per byte (no tokenizer yields more),
    token counts and logprob counts are clamped to what the later checks would accept, so a
    field over its own limit is refused by that check, naming it. An unset max_tokens is the
    model's default (`default_max_tokens`), else the rest of the context: the context."""
    sampling = request.sampling
    n = sampling.n if sampling.HasField("n") else 1
    best_of = sampling.best_of if sampling.HasField("best_of") else 0
    choices = max(n, best_of, 1)  # best_of candidates or beams all run
    choice_field = "best_of" if best_of > n else "n"
    prompt_tokens = min(_prompt_size(request), max_model_len)
    max_tokens = (sampling.max_tokens if sampling.HasField("max_tokens")
                  else default_max_tokens or max_model_len)
    max_tokens = min(max(max_tokens, 0), max_model_len)
    top = _entries(sampling, "logprobs", max_logprobs)
    prompt_top = _entries(sampling, "prompt_logprobs", max_logprobs)
    # Each beam re-submits the prompt with its tokens so far: every beam holds a prompt.
    prompts_held = choices if sampling.use_beam_search else 1
    return RequestCost({
        choice_field: choices * CHOICE_BYTES,
        "max_tokens": choices * max_tokens * OUTPUT_TOKEN_BYTES,
        "logprobs": choices * max_tokens * top * LOGPROB_ENTRY_BYTES,
        "prompt": prompts_held * prompt_tokens * PROMPT_TOKEN_BYTES,
        "prompt_logprobs": prompt_tokens * prompt_top * PROMPT_LOGPROB_ENTRY_BYTES,
    })


def embed_cost(request: inference_pb2.EmbedRequest, max_model_len: int) -> RequestCost:
    tokens = sum(min(_prompt_size(item), max_model_len) for item in request.inputs)
    return RequestCost({"inputs": len(request.inputs) * EMBED_INPUT_BYTES
                        + tokens * EMBED_TOKEN_BYTES})


def _entries(sampling: common_pb2.SamplingParams, name: str, max_logprobs: int) -> int:
    """Logprob entries per position: the top ones plus the chosen token's; none when unset."""
    if not sampling.HasField(name):
        return 0
    return min(max(getattr(sampling, name), 0), max_logprobs) + 1


def _prompt_size(message) -> int:
    """Tokens (token-id input) or bytes (text and chat: a bound on their tokens)."""
    which = message.WhichOneof("input")
    if which == "token_ids":
        return len(message.token_ids.ids)
    if which == "text":
        return len(message.text.encode())
    return message.chat.ByteSize() if which == "chat" else 0


class RequestMemoryLedger:
    """The bytes reserved by the requests in flight (asyncio side only: no lock needed)."""

    def __init__(self) -> None:
        self.in_use = 0
        self.in_flight = 0

    @contextmanager
    def admitted(self, cost: RequestCost, budget: int) -> Iterator[None]:
        """Reserve `cost` for the body of the `with`, released on every way out of it.
        Raises InvalidRequestError (alone over the budget) or QueueFullError (not now)."""
        total = cost.total
        if total > budget:
            field = cost.driving_field
            raise InvalidRequestError(
                f"this request would hold about {_size(total)} of host memory, more than the "
                f"server's whole budget of {_size(budget)} (--max-request-memory); {field} "
                "drives most of it: lower it", field=field)
        if self.in_use + total > budget:
            raise QueueFullError(
                f"requests in flight hold {_size(self.in_use)} of the {_size(budget)} "
                f"request-memory budget (--max-request-memory) and this one needs "
                f"{_size(total)}; retry later", reason="MEMORY_BUDGET_FULL")
        self.in_use += total
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_use -= total
            self.in_flight -= 1


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"
