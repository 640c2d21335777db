"""ScheduledBatch -> flattened model inputs and the step's AttentionMetadata.

Requests are reordered so that decode rows (one token each) come first, then prefill runs;
`sample_rows` maps back to the batch's own order of sampling requests:

    batch order:      [ A(prefill 5) | B(decode) | C(prefill 3, chunk: no sample) | D(decode) ]
    flattened rows:   [ B | D | A A A A A | C C C ]
    sample_rows:      [ 6 (A's last row), 0 (B), 1 (D) ]
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from engine.attention.backend import AttentionMetadata, PrefillSequence
from engine.batch import ScheduledBatch, ScheduledRequest


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    # Rows of the model output to sample from, aligned with `sample_requests` (batch order).
    sample_rows: torch.Tensor  # [N] int64
    sample_requests: list[ScheduledRequest]
    # First flattened row of each request, in batch order (prompt logprobs read row ranges).
    row_starts: list[int]


def prepare_inputs(batch: ScheduledBatch, block_size: int, device: torch.device) -> StepInputs:
    requests = batch.requests
    decode_indices = [i for i, request in enumerate(requests) if request.is_decode]
    prefill_indices = [i for i, request in enumerate(requests) if not request.is_decode]
    decodes = [requests[i] for i in decode_indices]
    prefills = [requests[i] for i in prefill_indices]

    input_ids: list[int] = [request.token_ids[request.start] for request in decodes]
    positions: list[int] = [request.start for request in decodes]
    slot_mapping: list[int] = [_slot(request, request.start, block_size) for request in decodes]
    prefill_sequences: list[PrefillSequence] = []
    for request in prefills:
        end = request.start + request.num_tokens
        input_ids.extend(request.token_ids[request.start : end])
        positions.extend(range(request.start, end))
        slots, sequence = _prefill_sequence(request, len(slot_mapping), block_size, device)
        slot_mapping.extend(slots)
        prefill_sequences.append(sequence)

    last_rows = [0] * len(requests)
    num_rows = 0
    for i in decode_indices + prefill_indices:
        num_rows += requests[i].num_tokens
        last_rows[i] = num_rows - 1
    row_starts = [last_rows[i] - requests[i].num_tokens + 1 for i in range(len(requests))]
    sample_requests = [request for request in requests if request.sample]
    sample_rows = [last_rows[i] for i, request in enumerate(requests) if request.sample]

    decode_tables, decode_lens, decode_mask = _decode_tensors(decodes, block_size, device)
    attn_metadata = AttentionMetadata(
        block_size=block_size,
        slot_mapping=_to_device(slot_mapping, device),
        num_decode_tokens=len(decodes),
        decode_block_tables=decode_tables,
        decode_context_lens=decode_lens,
        decode_mask=decode_mask,
        prefills=tuple(prefill_sequences),
    )
    return StepInputs(
        input_ids=_to_device(input_ids, device),
        positions=_to_device(positions, device),
        attn_metadata=attn_metadata,
        sample_rows=_to_device(sample_rows, device),
        sample_requests=sample_requests,
        row_starts=row_starts,
    )


def _slot(request: ScheduledRequest, position: int, block_size: int) -> int:
    return request.block_ids[position // block_size] * block_size + position % block_size


def _num_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _prefill_sequence(
    request: ScheduledRequest, query_start: int, block_size: int, device: torch.device
) -> tuple[np.ndarray, PrefillSequence]:
    context_len = request.start + request.num_tokens
    block_table = np.asarray(request.block_ids[: _num_blocks(context_len, block_size)], np.int64)
    new_positions = np.arange(request.start, context_len)
    slots = block_table[new_positions // block_size] * block_size + new_positions % block_size
    context_mask = None
    if request.start > 0:
        # Query i sits at position start + i and may see keys at positions <= start + i.
        key_positions = torch.arange(context_len, device=device)
        query_positions = torch.arange(request.start, context_len, device=device)
        context_mask = key_positions[None, :] <= query_positions[:, None]
    sequence = PrefillSequence(
        query_start=query_start,
        num_query_tokens=request.num_tokens,
        context_start=request.start,
        block_table=torch.from_numpy(block_table).to(device),
        context_mask=context_mask,
    )
    return slots, sequence


def _decode_tensors(
    decodes: list[ScheduledRequest], block_size: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Block tables [Bd, max_blocks] (padded with block 0, which is masked out), context
    lengths [Bd], and the additive mask [Bd, 1, 1, max_blocks * block_size].

    Built with numpy in one pass over the requests: small per-step tensors are cheaper there
    than through torch's multi-threaded kernels."""
    if not decodes:
        return None, None, None
    num_decodes = len(decodes)
    context_lens = np.fromiter((r.start + 1 for r in decodes), np.int64, num_decodes)
    blocks_needed = -(-context_lens // block_size)
    num_table_entries = int(blocks_needed.sum())
    block_ids = np.fromiter(
        chain.from_iterable(
            r.block_ids[:num_blocks] for r, num_blocks in zip(decodes, blocks_needed.tolist())
        ),
        np.int64,
        num_table_entries,
    )
    rows = np.repeat(np.arange(num_decodes), blocks_needed)
    row_starts = np.cumsum(blocks_needed) - blocks_needed
    columns = np.arange(num_table_entries) - np.repeat(row_starts, blocks_needed)
    tables = np.zeros((num_decodes, int(blocks_needed.max())), np.int64)
    tables[rows, columns] = block_ids
    key_positions = np.arange(tables.shape[1] * block_size)
    mask = np.where(key_positions[None, :] < context_lens[:, None], 0.0, -np.inf)
    mask = mask.astype(np.float32).reshape(num_decodes, 1, 1, -1)
    return (
        torch.from_numpy(tables).to(device),
        torch.from_numpy(context_lens).to(device),
        torch.from_numpy(mask).to(device),
    )


def _to_device(values: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64)).to(device)
