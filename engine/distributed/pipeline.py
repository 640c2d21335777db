"""Pipeline stages that overlap: a step's rows split into micro-batches of whole requests,
which flow through the stages one behind the other.

With S stages and M micro-batches, stage 0 runs micro-batch i+1 while stage 1 runs
micro-batch i; hidden states pass with non-blocking sends, so a stage never waits for its
successor to take what it sent. A step then costs about (M + S - 1) / M stage-steps instead of
S (two stages, two micro-batches: 1.5 instead of 2) when a micro-batch costs 1/M of the step.
It does not at small row counts: a projection over a few rows costs about what it costs over
a few dozen (it reads every weight either way; measured flat up to ~32-64 rows on one CPU
core), so a micro-batch gets at least `min_rows` rows (`--pipeline-micro-batch-min-tokens`)
and a step with fewer runs whole; small decode steps pass whole.

Every rank splits the same broadcast inputs with the same function, so the micro-batches'
sizes (and the receive buffers' shapes) agree without another message. Splits fall only on
request boundaries: a decode row, or a whole prefill (chunk). A micro-batch's rows keep their
order, and each stage runs the micro-batches in order, so a layer's KV writes of micro-batch
i are in the cache before micro-batch i+1 attends at that layer: the outputs are those of
the whole step (the prefix cache publishes only blocks computed in earlier steps, so no
request reads blocks another request of its step writes).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.distributed as dist

from engine.attention.backend import AttentionMetadata
from engine.distributed.group import TensorParallel


class PipelineCounters:
    """Micro-batches this process ran (in forward passes split into several), by the kind
    of rows they held: the tests check that the splits they mean to exercise happened."""

    split_steps: int = 0
    micro_batches: int = 0
    prefill_only: int = 0
    decode_only: int = 0
    mixed: int = 0

    @classmethod
    def reset(cls) -> None:
        cls.split_steps = cls.micro_batches = 0
        cls.prefill_only = cls.decode_only = cls.mixed = 0


@dataclass(frozen=True, slots=True)
class MicroBatch:
    start: int  # rows [start, stop) of the step's flattened batch
    stop: int
    # Per layer, as the step's (layers of one KV cache group share one object).
    layer_metadata: list[AttentionMetadata]


def request_bounds(metadata: AttentionMetadata) -> list[int]:
    """Row offsets where a request's rows end: after each decode row and each prefill."""
    ends = list(range(1, metadata.num_decode_tokens + 1))
    ends += [p.query_start + p.num_query_tokens for p in metadata.prefills]
    return ends


def split_rows(metadata: AttentionMetadata, count: int,
               min_rows: int = 1) -> list[tuple[int, int]]:
    """At most `count` contiguous row ranges of whole requests, with about equal numbers of
    rows (the cost of a stage's layers grows with its rows), and no more ranges than
    `min_rows` rows each allow. Deterministic: every rank computes the same ranges from the
    same inputs."""
    ends = request_bounds(metadata)
    total = ends[-1] if ends else 0
    min_rows = max(1, min_rows)
    count = max(1, min(count, len(ends), total // min_rows))
    inner = ends[:-1]  # where a cut may fall
    cuts: list[int] = []
    for k in range(1, count if inner else 1):
        target = total * k / count
        # The request boundary nearest the even split (the lower one on a tie).
        cut = min(inner, key=lambda end: (abs(end - target), end))
        previous = cuts[-1] if cuts else 0
        if cut - previous >= min_rows and total - cut >= min_rows:
            cuts.append(cut)
    bounds = [0, *cuts, total]
    return list(zip(bounds, bounds[1:]))


def slice_metadata(metadata: AttentionMetadata, start: int, stop: int) -> AttentionMetadata:
    """The metadata of rows [start, stop), which begin and end at request boundaries."""
    decodes = max(0, min(stop, metadata.num_decode_tokens) - start)
    tables = lens = mask = None
    if decodes:
        assert metadata.decode_block_tables is not None
        tables = metadata.decode_block_tables[start : start + decodes]
        lens = (None if metadata.decode_context_lens is None
                else metadata.decode_context_lens[start : start + decodes])
        mask = (None if metadata.decode_mask is None
                else metadata.decode_mask[start : start + decodes])
    prefills = tuple(replace(p, query_start=p.query_start - start) for p in metadata.prefills
                     if start <= p.query_start < stop)
    return replace(metadata, slot_mapping=metadata.slot_mapping[start:stop],
                   num_decode_tokens=decodes, decode_block_tables=tables,
                   decode_context_lens=lens, decode_mask=mask, prefills=prefills)


def micro_batches(layer_metadata: Sequence[AttentionMetadata], count: int,
                  min_rows: int = 1) -> list[MicroBatch]:
    """The step split into at most `count` micro-batches of about `min_rows` rows or more
    (the first layer's metadata holds the request boundaries every KV cache group shares)."""
    ranges = split_rows(layer_metadata[0], count, min_rows)
    batches = []
    for start, stop in ranges:
        sliced: dict[int, AttentionMetadata] = {}  # each group's metadata sliced once
        for metadata in layer_metadata:
            if id(metadata) not in sliced:
                sliced[id(metadata)] = slice_metadata(metadata, start, stop)
        per_layer = [sliced[id(metadata)] for metadata in layer_metadata]
        batches.append(MicroBatch(start, stop, per_layer))
    return batches


class StageModel(Protocol):
    """What a pipeline stage runs of the decoder (models/decoder.py)."""

    tp: TensorParallel

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor,
                   kv_caches: list[torch.Tensor],
                   layer_metadata: Sequence[AttentionMetadata]) -> torch.Tensor: ...

    def hidden_buffer(self, rows: int, device: torch.device) -> torch.Tensor: ...


def run_stage(model: StageModel, input_ids: torch.Tensor, positions: torch.Tensor,
              kv_caches: list[torch.Tensor],
              layer_metadata: Sequence[AttentionMetadata]) -> torch.Tensor | None:
    """This stage's share of one step, micro-batch by micro-batch. Stage 0 returns the last
    stage's hidden states of every row (before the final norm); other stages None."""
    tp = model.tp
    batches = micro_batches(layer_metadata, tp.micro_batches, tp.micro_batch_min_rows)
    _count(batches)
    # Sends in flight, with their tensors (which must live until the send completes).
    sending: list[tuple[dist.Work, torch.Tensor]] = []
    for batch in batches:
        rows = slice(batch.start, batch.stop)
        if tp.stage == 0:
            hidden = model.embed(input_ids[rows])
        else:
            hidden = tp.receive_from_stage(
                model.hidden_buffer(batch.stop - batch.start, input_ids.device), tp.stage - 1)
        hidden = model.run_layers(hidden, positions[rows], kv_caches, batch.layer_metadata)
        sending.append(tp.start_send_to_stage(hidden, tp.stage + 1))  # last: back to 0
    outputs = None
    if tp.stage == 0:
        received = [
            tp.receive_from_stage(model.hidden_buffer(batch.stop - batch.start,
                                                      input_ids.device), tp.num_stages - 1)
            for batch in batches]
        outputs = received[0] if len(received) == 1 else torch.cat(received)
    for work, _ in sending:
        work.wait()
    return outputs


def _count(batches: list[MicroBatch]) -> None:
    if len(batches) < 2:
        return
    PipelineCounters.split_steps += 1
    for batch in batches:
        metadata = batch.layer_metadata[0]
        PipelineCounters.micro_batches += 1
        if not metadata.num_decode_tokens:
            PipelineCounters.prefill_only += 1
        elif not metadata.prefills:
            PipelineCounters.decode_only += 1
        else:
            PipelineCounters.mixed += 1
