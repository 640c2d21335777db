"""best_of: run best_of candidates, return the n with the highest cumulative logprob.

The candidates stream as choices 0..best_of-1 from the engine loop (their sampler rows report
the chosen token's logprob, see sampling/logprobs.needs_logprobs). Which n win is known only
when every candidate has finished, so the events are held back and then replayed, best first,
renumbered 0..n-1: a best_of request streams nothing until it is complete (the REST bridge
therefore refuses `stream` with best_of != n, as the reference server does).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

from engine.generation import GenerationDelta, GenerationEvent, GenerationFinished
from engine.sampling_params import SamplingParams


def picks_best_of(params: SamplingParams) -> bool:
    return params.best_of is not None and params.best_of > params.n


async def select_best_of(
    events: AsyncIterator[GenerationEvent], params: SamplingParams
) -> AsyncIterator[GenerationEvent]:
    """`events` unchanged, or for best_of > n, the best n candidates replayed at the end."""
    async with aclosing(events):  # type: ignore[type-var]
        if not picks_best_of(params):
            async for event in events:
                yield event
            return
        deltas: dict[int, list[GenerationDelta]] = {}
        finished: dict[int, GenerationFinished] = {}
        scores: dict[int, float] = {}
        async for event in events:
            if isinstance(event, GenerationDelta):
                deltas.setdefault(event.index, []).append(event)
                scores[event.index] = scores.get(event.index, 0.0) + sum(
                    entry.chosen.logprob for entry in event.logprobs or ()
                )
            elif isinstance(event, GenerationFinished):
                finished[event.index] = event
            else:
                yield event  # GenerationStarted
    ranked = sorted(finished, key=lambda index: (-scores.get(index, 0.0), index))
    keep_logprobs = params.logprobs is not None
    for new_index, index in enumerate(ranked[: params.n]):
        for delta in deltas.get(index, ()):
            yield replace(
                delta,
                index=new_index,
                logprobs=delta.logprobs if keep_logprobs else None,
                prompt_logprobs=None,
            )
        yield replace(finished[index], index=new_index)
