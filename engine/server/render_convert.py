"""Inference/Render: a GenerateRequest read exactly as Generate reads it (the same wire
conversion, server defaults, parsing plan, input processor and constraint check), stopping
before anything reaches the scheduler. What comes back is what the engine would run: the
prompt's token ids and every sampling parameter resolved."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from engine.errors import InvalidRequestError
from engine.frontend.input_processor import InputProcessor, PreparedPrompt
from engine.generation import GenerationRequest
from engine.core.core_request import CoreRequest
from engine.sampling_params import SamplingParams
from engine.server.parsed_output import parsing_plan_of, with_parsing
from engine.server.proto_convert import generate_request_from_pb
from engine.server.request_defaults import with_server_defaults
from engine.structured.constraint import OutputConstraint
from protoserve.sampling_fields import SAMPLING_FIELDS
from protoserve.v1 import common_pb2, inference_pb2

if TYPE_CHECKING:
    from engine.frontend.served_model import Engine
    from engine.server.request_tracker import ServingOptions


async def render(
    request: inference_pb2.GenerateRequest, request_id: str, engine: Engine,
    options: ServingOptions,
) -> inference_pb2.RenderResponse:
    """The RenderResponse for `request`; raises the EngineError Generate would raise."""
    generation = with_server_defaults(
        generate_request_from_pb(request, request_id), request.sampling, engine)
    if (plan := parsing_plan_of(request, options)) is not None:
        generation = with_parsing(generation, request, plan, engine.tokenizer)
    if generation.sampling_params.use_beam_search:
        # A beam search runs as many one-token expansions its driver makes on the fly: there
        # is no single request to show.
        raise InvalidRequestError(
            "beam search requests cannot be rendered", field="use_beam_search")
    processor = engine.loop.processor
    prompt, core_requests = await engine.loop.off_loop(_prepare, processor, generation)
    await processor.check_constraint(generation)
    first = core_requests[0]
    response = inference_pb2.RenderResponse(
        request_id=request_id, prompt_token_ids=prompt.token_ids, prompt_text=prompt.text or "")
    # Choice 0's parameters (later choices differ only in a derived seed), with max_tokens
    # as admission fitted it to the context left after the prompt.
    params = replace(first.sampling_params, max_tokens=first.max_tokens)
    response.sampling.CopyFrom(sampling_to_pb(params))
    if generation.constraint is not None:
        response.constraint.CopyFrom(constraint_to_pb(generation.constraint))
    return response


def _prepare(
    processor: InputProcessor, generation: GenerationRequest
) -> tuple[PreparedPrompt, list[CoreRequest]]:
    prompt = processor.prepare_prompt(generation)
    return prompt, processor.make_requests(generation, prompt)


def sampling_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    """The engine's SamplingParams on the wire: every scalar the engine holds a value for
    (None, as for seed or logprobs, stays unset), repeated and map fields as held."""
    pb = common_pb2.SamplingParams()
    for name in SAMPLING_FIELDS.scalar:
        value = getattr(params, name)
        if value is not None:
            setattr(pb, name, value)
    for name in SAMPLING_FIELDS.repeated:
        getattr(pb, name).extend(getattr(params, name) or ())
    for name in SAMPLING_FIELDS.map:
        getattr(pb, name).update(getattr(params, name))
    return pb


def constraint_to_pb(constraint: OutputConstraint) -> common_pb2.OutputConstraint:
    pb = common_pb2.OutputConstraint()
    if constraint.json_schema is not None:
        pb.json_schema = constraint.json_schema
    elif constraint.regex is not None:
        pb.regex = constraint.regex
    elif constraint.choice is not None:
        pb.choice.choices.extend(constraint.choice)
    elif constraint.grammar is not None:
        pb.grammar = constraint.grammar
    elif constraint.json_object:
        pb.json_object = True
    if constraint.whitespace_pattern is not None:
        pb.whitespace_pattern = constraint.whitespace_pattern
    if constraint.backend is not None:
        pb.backend = constraint.backend
    return pb
