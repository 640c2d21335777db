"""Runs a `use_beam_search` request over the engine loop (asyncio side).

Each step submits one single-token greedy request per live beam, prompt = prompt + beam tokens,
asking for the top K logprobs (K = engine.frontend.beam_search.BeamSearch.num_candidates, 2 * width
or more; such a beam expansion is not bounded by --max-logprobs, which limits only what a
client asks to see). Greedy rows with no penalty, bias or mask report the model's plain
log-softmax, which is what beams are ranked by. Beams share their prompt's KV blocks through the prefix cache, so a step recomputes
only each beam's uncached tail.

    step 0:  [prompt]                      -> Started (tokenization, prompt_logprobs, cache)
    step s:  [prompt + beam_i  for i live] -> top-K logprobs each -> BeamSearch.step
    done:    the n best hypotheses, as choices 0..n-1: one Delta + one Finished each

Only Started streams before the search ends (which beams win is known only then): the events
of every choice are sent at the end, as the reference server does.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING

from engine.frontend.beam_search import (
    BeamCandidate,
    BeamSearch,
    Hypothesis,
    beam_stop_token_ids,
    beam_width,
    check_beam_search_params,
)
from engine.errors import InvalidRequestError
from engine.generation import (
    GenerationDelta,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    GenerationStarted,
    PositionLogprobs,
    PromptInput,
)
from engine.core.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.frontend.sampling_resolution import check_logprobs_limit

if TYPE_CHECKING:
    from engine.frontend.engine_loop import EngineLoop


class _Interrupted(Exception):
    """A step's request ended without a token (admin abort): the whole search ends so."""

    def __init__(self, reason: FinishReason) -> None:
        super().__init__(str(reason))
        self.reason = reason


async def beam_search(
    loop: EngineLoop, req: GenerationRequest, deadline: float | None = None
) -> AsyncIterator[GenerationEvent]:
    """The events of a beam search request: Started after the first step, then each of the
    n best beams as one Delta and one Finished. Errors of any step end the iterator."""
    params = req.sampling_params
    check_beam_search_params(params)
    if req.constraint is not None:
        raise InvalidRequestError("guided decoding is not supported with use_beam_search", field="constraint")
    limits = loop.processor.limits
    if params.max_tokens is not None and params.max_tokens > limits.max_model_len:
        raise InvalidRequestError(
            f"max_tokens ({params.max_tokens}) exceeds the model's context of "
            f"{limits.max_model_len} tokens",
            field="max_tokens",
        )
    # The client's logprobs are bounded by --max-logprobs; the K the beams are ranked by is
    # the server's own business (the step requests are marked as beam expansions).
    check_logprobs_limit(params, limits.max_logprobs)
    width = beam_width(params)
    stop_ids = beam_stop_token_ids(params, limits.eos_token_ids)
    num_candidates = BeamSearch(width, 1, stop_ids).num_candidates
    step_params = SamplingParams(
        temperature=0.0,
        max_tokens=1,
        logprobs=max(num_candidates, params.logprobs or 0),
        # Carried so that their range is checked; a one-token request never needs them.
        stop_token_ids=params.stop_token_ids,
    )
    first = replace(
        req,
        request_id=f"{req.request_id}-beam0",
        beam_expansion=True,
        sampling_params=replace(
            step_params,
            prompt_logprobs=params.prompt_logprobs,
            truncate_prompt_tokens=params.truncate_prompt_tokens,
        ),
    )
    try:
        started, entry = await _expand(loop, first, deadline)
        prompt_ids = started.prompt_token_ids
        max_tokens = limits.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        search = BeamSearch(width, max_tokens, stop_ids, params.length_penalty)
        search.step([_candidates(entry)], [entry])
        yield replace(started, request_id=req.request_id, max_tokens=max_tokens)
        step = 1
        while not search.done:
            children = [
                GenerationRequest(
                    request_id=f"{req.request_id}-beam{step}-{i}",
                    prompt=PromptInput(token_ids=prompt_ids + list(beam.token_ids)),
                    sampling_params=step_params,
                    priority=req.priority,
                    cache_salt=req.cache_salt,
                    return_text=False,
                    beam_expansion=True,
                    lora=req.lora,
                )
                for i, beam in enumerate(search.live)
            ]
            entries = await _expand_all(loop, children, deadline)
            search.step([_candidates(e) for e in entries], entries)
            step += 1
    except _Interrupted as interrupted:
        for index in range(params.n):
            yield GenerationFinished(index, interrupted.reason, 0)
        return
    for index, hypothesis in enumerate(search.best(params.n)):
        for event in _choice_events(loop, index, hypothesis, prompt_ids, params, req.return_text):
            yield event


async def _expand(
    loop: EngineLoop, child: GenerationRequest, deadline: float | None
) -> tuple[GenerationStarted, PositionLogprobs]:
    """Run one single-token request; its Started event and its token's logprobs entry."""
    started: GenerationStarted | None = None
    entry: PositionLogprobs | None = None
    finished: GenerationFinished | None = None
    async with aclosing(loop.generate(child, deadline)) as events:
        async for event in events:
            if isinstance(event, GenerationStarted):
                started = event
            elif isinstance(event, GenerationDelta) and event.logprobs:
                entry = event.logprobs[0]
            elif isinstance(event, GenerationFinished):
                finished = event
    if started is None or entry is None:
        raise _Interrupted(finished.reason if finished is not None else FinishReason.ABORT)
    return started, entry


async def _expand_all(
    loop: EngineLoop, children: list[GenerationRequest], deadline: float | None
) -> list[PositionLogprobs]:
    """Run one step's requests together. A TaskGroup cancels (and so aborts) the others when
    one fails or the caller is cancelled; the first failure is raised as itself so the servers
    map it as they would any request's error."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_expand(loop, child, deadline)) for child in children]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [task.result()[1] for task in tasks]


def _candidates(entry: PositionLogprobs) -> list[BeamCandidate]:
    return [BeamCandidate(top.token_id, top.logprob) for top in entry.top]


def _choice_events(
    loop: EngineLoop,
    index: int,
    hypothesis: Hypothesis,
    prompt_ids: list[int],
    params: SamplingParams,
    return_text: bool,
) -> list[GenerationEvent]:
    token_ids = list(hypothesis.beam.token_ids)
    text = ""
    if return_text:
        # Detokenized as a stream would be (same special-token and spacing rules).
        detokenizer = loop.processor.tokenizer.new_detokenizer(
            prompt_ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        text = detokenizer.step(token_ids) + detokenizer.flush()
    logprobs = None
    if params.logprobs is not None:
        logprobs = [
            _user_logprobs(entry, token_id, params.logprobs)  # type: ignore[arg-type]
            for entry, token_id in zip(hypothesis.beam.details, token_ids)
        ]
    stop_id = hypothesis.stop_token_id
    reason = FinishReason.STOP if stop_id is not None else FinishReason.LENGTH
    return [
        GenerationDelta(index, token_ids, text, logprobs=logprobs, last=True),
        GenerationFinished(
            index, reason, len(token_ids),
            # As for sampled requests: EOS finishes with STOP and no stop token id.
            stop_token_id=stop_id if stop_id in params.stop_token_ids else None,
        ),
    ]


def _user_logprobs(entry: PositionLogprobs, token_id: int, num_top: int) -> PositionLogprobs:
    """The step's entry seen from the beam's token: it is among the top (it was ranked)."""
    chosen = next(top for top in entry.top if top.token_id == token_id)
    return PositionLogprobs(chosen, entry.top[:num_top])
