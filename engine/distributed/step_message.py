"""What rank 0 sends the other tensor-parallel ranks each step: two broadcasts, a fixed
header (its kind and sizes, on the control group) and one int64 payload holding every
prepared input, or the hidden rows whose logits rank 0 needs. Workers never see requests,
sampling parameters or the block manager: only the tensors the forward pass reads.

    header  [kind, tokens, decodes, decode_max_blocks, prefills, payload_len, rows, block_size,
             groups]
            (FORWARD: rows = blocks of a scratch cache, 0 for the KV cache itself; block_size
            that scratch cache's. An embedding request on a generative model runs on one.)
    payload [input_ids T | positions T | slot_mapping T | decode context_lens Bd |
             decode block tables Bd*max_blocks | per prefill (query_start, num_query_tokens,
             context_start, table_len) | prefill block tables, one after another |
             then per further KV cache group: its slot_mapping, decode tables, prefill tables
             (the same sizes as the first group's)]
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist

from engine.attention.backend import AttentionMetadata, PrefillSequence
from engine.distributed.group import TensorParallel
from engine.lora.request import LoRARequest
from engine.runner.input_prep import prefill_context_mask

HEADER_SIZE = 9


class MessageKind(IntEnum):
    FORWARD = 1
    LOGITS = 2  # the payload is the hidden rows [rows, hidden] in the model's dtype
    STOP = 3
    HEARTBEAT = 4  # an idle server's check that every rank still answers (header[1]: ms)
    # Before a FORWARD with adapter rows: each row's LoRA slot (-1: base), then per adapter
    # rank 0 newly placed (slot, lora_id, path length, the path's UTF-8 bytes).
    LORA = 5


@dataclass(frozen=True, slots=True)
class ForwardInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    scratch_blocks: int  # 0: the KV cache itself
    # With several KV cache groups: each group's metadata, the first being attn_metadata.
    group_metadata: tuple[AttentionMetadata, ...] = ()


def send_forward(tp: TensorParallel, input_ids: torch.Tensor, positions: torch.Tensor,
                 metadata: AttentionMetadata, scratch_blocks: int = 0,
                 group_metadata: Sequence[AttentionMetadata] = ()) -> None:
    """Rank 0: one step's prepared inputs to every other rank; `scratch_blocks` > 0: they
    address a fresh scratch cache of that many blocks (of metadata.block_size)."""
    prefills = metadata.prefills
    tables = metadata.decode_block_tables
    parts = [input_ids, positions, metadata.slot_mapping]
    if tables is not None and metadata.decode_context_lens is not None:
        parts += [metadata.decode_context_lens, tables.reshape(-1)]
    meta = [v for p in prefills for v in (p.query_start, p.num_query_tokens, p.context_start,
                                          p.block_table.numel())]
    parts.append(torch.tensor(meta, dtype=torch.int64, device=input_ids.device))
    parts += [p.block_table for p in prefills]
    for group in group_metadata[1:]:
        parts.append(group.slot_mapping)
        if group.decode_block_tables is not None:
            parts.append(group.decode_block_tables.reshape(-1))
        parts += [p.block_table for p in group.prefills]
    payload = torch.cat(parts).to(tp.device)
    _send_header(tp, MessageKind.FORWARD, input_ids.numel(), metadata.num_decode_tokens,
                 0 if tables is None else tables.shape[1], len(prefills), payload.numel(),
                 scratch_blocks, metadata.block_size, max(1, len(group_metadata)))
    dist.broadcast(payload, src=0)


def send_lora_step(tp: TensorParallel, row_slots: list[int],
                   loads: Sequence[tuple[int, LoRARequest]]) -> None:
    """Rank 0: the next forward's row slots and the adapters to place first (each rank
    reads its share from the same path, so the directory must exist on every node)."""
    payload = list(row_slots)
    for slot, lora in loads:
        path = list(lora.path.encode())
        payload += [slot, lora.lora_id, len(path), *path]
    _send_header(tp, MessageKind.LORA, len(row_slots), len(loads), len(payload), 0, 0, 0, 0, 0)
    dist.broadcast(torch.tensor(payload, dtype=torch.int64, device=tp.device), src=0)


def receive_lora_step(
    tp: TensorParallel, header: torch.Tensor
) -> tuple[list[int], list[tuple[int, LoRARequest]]]:
    _, rows, num_loads, payload_len = header.tolist()[:4]
    payload = torch.empty(payload_len, dtype=torch.int64, device=tp.device)
    dist.broadcast(payload, src=0)
    values = payload.tolist()
    loads, at = [], rows
    for _ in range(num_loads):
        slot, lora_id, length = values[at : at + 3]
        path = bytes(values[at + 3 : at + 3 + length]).decode()
        # Workers never see adapter names; the id keys their cache of loaded adapters.
        loads.append((slot, LoRARequest(name=f"lora-{lora_id}", lora_id=lora_id, path=path)))
        at += 3 + length
    return values[:rows], loads


def send_logits_rows(tp: TensorParallel, hidden: torch.Tensor) -> None:
    """Rank 0: the hidden rows it is about to compute logits for (every rank holds the
    same hidden states; which rows is rank 0's sampling business)."""
    _send_header(tp, MessageKind.LOGITS, 0, 0, 0, 0, 0, hidden.shape[0], 0, 0)
    dist.broadcast(hidden.contiguous(), src=0)


def send_stop(tp: TensorParallel) -> None:
    _send_header(tp, MessageKind.STOP, 0, 0, 0, 0, 0, 0, 0, 0)


def send_heartbeat(tp: TensorParallel, timeout_s: float) -> None:
    """Rank 0, while idle: every rank must answer within `timeout_s`; raises RuntimeError
    naming the ranks that did not (gloo's monitored barrier), or at once when a rank's
    sockets closed (its process died)."""
    timeout_ms = int(timeout_s * 1000)
    _send_header(tp, MessageKind.HEARTBEAT, timeout_ms, 0, 0, 0, 0, 0, 0, 0)
    answer_heartbeat(tp, timeout_ms)


def answer_heartbeat(tp: TensorParallel, timeout_ms: int) -> None:
    # On the control group (gloo on every backend): monitored_barrier is gloo's.
    dist.monitored_barrier(group=tp.control_group, timeout=timedelta(milliseconds=timeout_ms))


def _send_header(tp: TensorParallel, *values: int) -> None:
    header = torch.tensor(values, dtype=torch.int64)
    dist.broadcast(header, src=0, group=tp.control_group)


def receive_header(tp: TensorParallel) -> torch.Tensor:
    """A worker: waits (on the long-timeout control group) for rank 0's next message."""
    header = torch.empty(HEADER_SIZE, dtype=torch.int64)
    dist.broadcast(header, src=0, group=tp.control_group)
    return header


def receive_forward(tp: TensorParallel, header: torch.Tensor, block_size: int) -> ForwardInputs:
    """`block_size`: the KV cache's (a scratch forward names its own)."""
    _, tokens, decodes, max_blocks, num_prefills, payload_len, scratch, scratch_block, groups = (
        header.tolist())
    if scratch:
        block_size = scratch_block
    payload = torch.empty(payload_len, dtype=torch.int64, device=tp.device)
    dist.broadcast(payload, src=0)
    input_ids, positions, slots, rest = payload.split([tokens, tokens, tokens,
                                                       payload_len - 3 * tokens])
    decode_lens = decode_tables = None
    if max_blocks:
        decode_lens, decode_tables, rest = rest.split(
            [decodes, decodes * max_blocks, rest.numel() - decodes * (1 + max_blocks)])
        decode_tables = decode_tables.view(decodes, max_blocks)
    meta_t, tables = rest.split([4 * num_prefills, rest.numel() - 4 * num_prefills])
    meta = meta_t.tolist()
    table_lens = [meta[4 * i + 3] for i in range(num_prefills)]
    group_size = tokens + decodes * max_blocks + sum(table_lens)
    tables, extra_groups = tables.split([sum(table_lens), (groups - 1) * group_size])
    prefill_tables = tables.split(table_lens)
    prefills = []
    for i, table in enumerate(prefill_tables):
        query_start, num_query, context_start, _ = meta[4 * i : 4 * i + 4]
        prefills.append(PrefillSequence(
            query_start=query_start, num_query_tokens=num_query, context_start=context_start,
            block_table=table,
            context_mask=prefill_context_mask(context_start, num_query, tp.device),
        ))
    metadata = AttentionMetadata(
        block_size=block_size, slot_mapping=slots, num_decode_tokens=decodes,
        decode_block_tables=decode_tables, decode_context_lens=decode_lens, decode_mask=None,
        prefills=tuple(prefills),
    )
    group_metadata = ()
    if groups > 1:
        group_metadata = (metadata, *(
            _group_metadata(metadata, part, tokens, decodes * max_blocks, table_lens)
            for part in extra_groups.split(group_size)))
    return ForwardInputs(input_ids, positions, metadata, scratch, group_metadata)


def _group_metadata(first: AttentionMetadata, part: torch.Tensor, tokens: int,
                    decode_table_size: int, table_lens: list[int]) -> AttentionMetadata:
    """Another KV cache group's metadata: the first's with its own slots and block tables."""
    slots, decode_tables, tables = part.split(
        [tokens, decode_table_size, part.numel() - tokens - decode_table_size])
    return replace(
        first, slot_mapping=slots,
        decode_block_tables=(None if first.decode_block_tables is None
                             else decode_tables.view(first.decode_block_tables.shape)),
        prefills=tuple(replace(prefill, block_table=table)
                       for prefill, table in zip(first.prefills, tables.split(table_lens))),
    )


def receive_logits_rows(tp: TensorParallel, header: torch.Tensor, hidden_size: int,
                        dtype: torch.dtype) -> torch.Tensor:
    hidden = torch.empty(int(header[6]), hidden_size, dtype=dtype, device=tp.device)
    dist.broadcast(hidden, src=0)
    return hidden
