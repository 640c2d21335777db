"""Which request may run: the LoRA slot limit on admission, the preemption victim, and the
output record every scheduler event starts from."""
from __future__ import annotations

from collections.abc import Sequence

from engine.core.outputs import RequestOutput
from engine.core.request import Request


def adapter_fits(request: Request, running: Sequence[Request], max_loras: int | None) -> bool:
    """Every running request may be scheduled in one step, so the running set must stay
    within the runner's max_loras adapter slots (None: LoRA off)."""
    if request.lora is None or max_loras is None:
        return True
    active = {r.lora_id for r in running if r.lora is not None}
    return request.lora_id in active or len(active) < max_loras


def pick_victim(policy: str, candidates: Sequence[Request]) -> Request:
    """The request a full cache preempts: the lowest priority (then the latest arrival), or
    under FCFS the newest."""
    if policy == "priority":
        return max(candidates, key=lambda r: (r.priority, r.arrival_time))
    return candidates[-1]


def output_of(request: Request, new_token_ids: list[int]) -> RequestOutput:
    return RequestOutput(
        request_id=request.request_id,
        new_token_ids=new_token_ids,
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=request.num_cached_tokens,
        first_scheduled_time=request.first_scheduled_time,
    )
