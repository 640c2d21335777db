"""ScheduledBatch -> flattened model inputs and the step's AttentionMetadata.

Requests are reordered so that decode rows (one token each) come first, then prefill runs;
`sample_rows` maps back to the batch's own order of sampling requests:

    batch order:      [ A(prefill 5) | B(decode) | C(prefill 3, chunk: no sample) | D(decode) ]
    flattened rows:   [ B | D | A A A A A | C C C ]
    sample_rows:      [ 6 (A's last row), 0 (B), 1 (D) ]

A request verifying draft tokens at its decode point (speculative decoding) is decode-shaped
too: its newest token and drafts become consecutive decode rows, each a query over the
request's own blocks with the context up to its position, so causality within the run comes
from the context lengths and the step stays on the decode path (the one-call fused layers,
engine/models/fused_decode.py, and the decode attention kernel):

    request E, newest token at position p, drafts d0 d1:
    rows:          [ E(p) | E(d0) | E(d1) ]    context_lens: [ p+1 | p+2 | p+3 ]

With several KV cache groups (engine/kv_cache/groups.py) each group gets its own metadata:
its slot mapping, decode block tables and prefill block tables read that group's table of
each request; the rest (context lengths, prefill runs, masks) is shared.

Cost: this runs once per step, right after the previous step's forward pass has pushed the
interpreter's, numpy's and torch's code and data out of the CPU caches, when every distinct
numpy or torch call costs tens of microseconds. So the integer inputs are gathered in plain
Python lists and become tensors through one numpy array for all of them (`_Int64Pack`),
rather than through a few small numpy/torch operations per input.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.attention.backend import AttentionMetadata, PrefillSequence
from engine.core.batch import ScheduledBatch, ScheduledRequest


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    # Rows of the model output to sample from, aligned with `sample_requests` (batch order).
    sample_rows: torch.Tensor  # [N] int64
    # sample_rows is 0..N-1 over all T rows (a pure decode batch): no gather needed.
    samples_every_row_in_order: bool
    sample_requests: list[ScheduledRequest]
    # First flattened row of each request, in batch order (prompt logprobs read row ranges).
    row_starts: list[int]
    # With several KV cache groups: each group's metadata (the first is attn_metadata);
    # empty with one group.
    group_metadata: tuple[AttentionMetadata, ...] = ()


def prepare_inputs(
    batch: ScheduledBatch, block_size: int, device: torch.device, num_kv_groups: int = 1
) -> StepInputs:
    requests = batch.requests
    decodes = [request for request in requests if _decode_rows(request)]
    prefills = [request for request in requests if not _decode_rows(request)]
    num_decode_rows = sum(_decode_rows(request) for request in decodes)
    row_starts = _row_starts(requests, len(decodes), num_decode_rows)
    sample_requests = [request for request in requests if request.sample]
    sample_rows = [
        row_start + request.num_tokens - 1
        for request, row_start in zip(requests, row_starts)
        if request.sample
    ]

    # Decode rows: each request's newest token, at position `start`, then its drafts.
    if num_decode_rows == len(decodes):
        positions = [request.start for request in decodes]
        input_ids = [request.token_ids[request.start] for request in decodes]
        row_requests = decodes
    else:
        positions, input_ids, row_requests = [], [], []
        for request in decodes:
            positions.extend(range(request.start, request.start + request.num_tokens))
            input_ids.append(request.token_ids[request.start])
            input_ids.extend(request.draft_token_ids)
            row_requests.extend([request] * request.num_tokens)
    decode_positions = list(positions)
    slot_mapping = [
        request.block_ids[position // block_size] * block_size + position % block_size
        for request, position in zip(row_requests, positions)
    ]
    context_lens = [position + 1 for position in positions]
    prefill_block_tables = []
    for request in prefills:
        end = request.start + request.num_tokens
        input_ids.extend(request.token_ids[request.start : end])
        if request.draft_token_ids:  # after the newest token, which the slice above ends at
            input_ids.extend(request.draft_token_ids)
        positions.extend(range(request.start, end))
        slot_mapping.extend(_prefill_slots(request, block_size))
        prefill_block_tables.append(request.block_ids[: _num_blocks(end, block_size)])

    pack = _Int64Pack()
    for values in (input_ids, positions, slot_mapping, sample_rows):
        pack.add(values)
    if decodes:
        pack.add(context_lens)
        pack.add(*_decode_block_tables(
            [request.block_ids for request in row_requests], context_lens, block_size))
    for block_table in prefill_block_tables:
        pack.add(block_table)
    for group in range(1, num_kv_groups):
        _add_group_tables(
            pack, group, row_requests, decode_positions, prefills, context_lens, block_size
        )
    tensors = pack.tensors(device)
    input_ids_t, positions_t, slot_mapping_t, sample_rows_t = tensors[:4]
    decode_lens, decode_tables = tensors[4:6] if decodes else (None, None)

    # Per extra group: its slot mapping, its decode tables (if any), its prefill tables.
    num_group_tensors = (1 if decodes else 0) + len(prefills)
    first_prefill = 6 if decodes else 4
    prefill_sequences = []
    query_start = num_decode_rows
    prefill_tables = tensors[first_prefill : first_prefill + len(prefills)]
    for request, block_table in zip(prefills, prefill_tables):
        prefill_sequences.append(_prefill_sequence(request, query_start, block_table, device))
        query_start += request.num_tokens
    attn_metadata = AttentionMetadata(
        block_size=block_size,
        slot_mapping=slot_mapping_t,
        num_decode_tokens=num_decode_rows,
        decode_block_tables=decode_tables,
        decode_context_lens=decode_lens,
        decode_mask=None,  # only the torch backend needs it, and derives it itself
        prefills=tuple(prefill_sequences),
    )
    group_metadata: tuple[AttentionMetadata, ...] = ()
    if num_kv_groups > 1:
        group_metadata = (attn_metadata,) + tuple(
            _group_metadata(attn_metadata, tensors[start : start + 1 + num_group_tensors])
            for start in range(first_prefill + len(prefills), len(tensors), 1 + num_group_tensors)
        )
    return StepInputs(
        input_ids=input_ids_t,
        positions=positions_t,
        attn_metadata=attn_metadata,
        sample_rows=sample_rows_t,
        samples_every_row_in_order=(
            len(sample_rows) == len(input_ids) and sample_rows == list(range(len(sample_rows)))
        ),
        sample_requests=sample_requests,
        row_starts=row_starts,
        group_metadata=group_metadata,
    )


def _group_table(request: ScheduledRequest, group: int) -> Sequence[int]:
    """The request's block table of a KV cache group (block_ids for a request that has none
    of its own, such as the memory profile's)."""
    tables = request.block_tables
    return tables[group] if group < len(tables) else request.block_ids


def _add_group_tables(
    pack: _Int64Pack, group: int, row_requests: list[ScheduledRequest],
    decode_positions: list[int], prefills: list[ScheduledRequest], context_lens: list[int],
    block_size: int,
) -> None:
    """One group's slot mapping, then its decode tables (if any decode rows; `row_requests`:
    each decode row's request, at `decode_positions`), then one block table per prefill: the
    layout `_group_metadata` reads back."""
    decode_tables = [_group_table(request, group) for request in row_requests]
    slots = [
        table[position // block_size] * block_size + position % block_size
        for table, position in zip(decode_tables, decode_positions)
    ]
    prefill_tables = [_group_table(request, group) for request in prefills]
    for request, table in zip(prefills, prefill_tables):
        slots.extend(_prefill_slots(request, block_size, table))
    pack.add(slots)
    if row_requests:
        pack.add(*_decode_block_tables(decode_tables, context_lens, block_size))
    for request, table in zip(prefills, prefill_tables):
        pack.add(table[: _num_blocks(request.start + request.num_tokens, block_size)])


def _group_metadata(first: AttentionMetadata, tensors: list[torch.Tensor]) -> AttentionMetadata:
    """The first group's metadata with another group's slot mapping and block tables."""
    slot_mapping, rest = tensors[0], tensors[1:]
    decode_tables = first.decode_block_tables
    if first.num_decode_tokens:
        decode_tables, rest = rest[0], rest[1:]
    return AttentionMetadata(
        block_size=first.block_size,
        slot_mapping=slot_mapping,
        num_decode_tokens=first.num_decode_tokens,
        decode_block_tables=decode_tables,
        decode_context_lens=first.decode_context_lens,
        decode_mask=first.decode_mask,
        prefills=tuple(
            replace(prefill, block_table=table)
            for prefill, table in zip(first.prefills, rest, strict=True)
        ),
    )


class _Int64Pack:
    """Integer lists turned into int64 tensors (one per list, in the order added) by a single
    numpy conversion and, off the CPU, a single host-to-device copy."""

    def __init__(self) -> None:
        self._values: list[int] = []
        self._bounds: list[int] = [0]  # where each list starts in _values, then the end
        self._shapes: list[tuple[int, ...] | None] = []  # None: 1-D

    def add(self, values: list[int], shape: tuple[int, ...] | None = None) -> None:
        self._values += values
        self._bounds.append(len(self._values))
        self._shapes.append(shape)

    def tensors(self, device: torch.device) -> list[torch.Tensor]:
        packed = np.array(self._values, dtype=np.int64)
        bounds, shapes = self._bounds, self._shapes
        if device.type != "cpu":
            sizes = [end - start for start, end in zip(bounds, bounds[1:])]
            pieces = torch.from_numpy(packed).to(device).split(sizes)
            return [p if s is None else p.view(s) for p, s in zip(pieces, shapes)]
        # CPU: numpy views, each wrapped without a copy.
        views = [packed[start:end] for start, end in zip(bounds, bounds[1:])]
        return [torch.from_numpy(v if s is None else v.reshape(s)) for v, s in zip(views, shapes)]


def _row_starts(
    requests: list[ScheduledRequest], num_decodes: int, num_decode_rows: int
) -> list[int]:
    """First flattened row of each request, in batch order: decode rows first, then the
    prefill runs, each group in batch order."""
    if num_decodes == num_decode_rows == len(requests):
        return list(range(num_decode_rows))
    row_starts = []
    next_decode_row, next_prefill_row = 0, num_decode_rows
    for request in requests:
        if _decode_rows(request):
            row_starts.append(next_decode_row)
            next_decode_row += request.num_tokens
        else:
            row_starts.append(next_prefill_row)
            next_prefill_row += request.num_tokens
    return row_starts


# Drafts per verifying request that still run as decode rows: each row reads the request's
# context once, so a long run of drafts is cheaper as one prefill-shaped chunk.
MAX_DECODE_QUERY_TOKENS = 8


# Drafts per verifying request that still run as decode rows: each row reads the request's
# context once, so a long run of drafts is cheaper as one prefill-shaped chunk.
MAX_DECODE_QUERY_TOKENS = 8


def _decode_rows(request: ScheduledRequest) -> int:
    """Rows the request takes on the decode path: 1 for a plain decode, 1 + drafts for a
    verification at its decode point (see the top), 0 for a prefill run."""
    num_tokens = request.num_tokens
    if num_tokens == 1:
        return 1
    drafts = request.draft_token_ids
    if (
        drafts
        and num_tokens == 1 + len(drafts) <= MAX_DECODE_QUERY_TOKENS
        and request.start + 1 == len(request.token_ids)
    ):
        return num_tokens
    return 0


def _num_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _prefill_slots(
    request: ScheduledRequest, block_size: int, block_ids: Sequence[int] | None = None
) -> list[int]:
    """Cache slots of positions [start, start + num_tokens) in `block_ids` (the request's
    own by default): one run of consecutive slots per block touched, so the work grows with
    blocks rather than tokens."""
    if block_ids is None:
        block_ids = request.block_ids
    slots: list[int] = []
    position, end = request.start, request.start + request.num_tokens
    while position < end:
        block, offset = divmod(position, block_size)
        run = min(end - position, block_size - offset)
        first_slot = block_ids[block] * block_size + offset
        slots.extend(range(first_slot, first_slot + run))
        position += run
    return slots


def _prefill_sequence(
    request: ScheduledRequest, query_start: int, block_table: torch.Tensor, device: torch.device
) -> PrefillSequence:
    return PrefillSequence(
        query_start=query_start,
        num_query_tokens=request.num_tokens,
        context_start=request.start,
        block_table=block_table,
        context_mask=prefill_context_mask(request.start, request.num_tokens, device),
    )


def prefill_context_mask(
    context_start: int, num_query_tokens: int, device: torch.device
) -> torch.Tensor | None:
    """[num_query_tokens, context_len] causal mask of a chunk after cached tokens; None for a
    chunk from position 0 (plain causal). Tensor-parallel workers rebuild it from the ints."""
    if context_start == 0:
        return None
    context_len = context_start + num_query_tokens
    # Query i sits at position start + i and may see keys at positions <= start + i.
    key_positions = torch.arange(context_len, device=device)
    query_positions = torch.arange(context_start, context_len, device=device)
    return key_positions[None, :] <= query_positions[:, None]


def _decode_block_tables(
    block_tables: list[Sequence[int]], context_lens: list[int], block_size: int
) -> tuple[list[int], tuple[int, int]]:
    """Block tables [Bd, max_blocks], flattened row by row; short rows are padded with
    block 0, which attention never reads (it stops at each row's context length)."""
    blocks_needed = [_num_blocks(length, block_size) for length in context_lens]
    max_blocks = max(blocks_needed)
    padding = [0] * max_blocks
    tables: list[int] = []
    for block_table, num_blocks in zip(block_tables, blocks_needed):
        tables += block_table[:num_blocks]
        tables += padding[: max_blocks - num_blocks]
    return tables, (len(block_tables), max_blocks)

