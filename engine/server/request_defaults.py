"""What the server fills in for a Generate request after the wire conversion: the model's
sampling defaults for fields the client left unset, and the guided-decoding backend its name
(or the server's default) resolves to, with that name's options applied."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from engine.generation import GenerationRequest
from engine.structured.backend_names import BackendChoice, apply_backend

from protoserve.v1 import common_pb2

if TYPE_CHECKING:
    from engine.frontend.served_model import Engine


def with_server_defaults(
    generation: GenerationRequest, sampling: common_pb2.SamplingParams, engine: Engine
) -> GenerationRequest:
    config = engine.config
    defaults = {name: value for name, value in config.generation_defaults
                if not sampling.HasField(name)}
    if defaults:
        if sampling.use_beam_search:
            defaults.pop("temperature", None)  # beams rank by log-probabilities (temperature 0)
        if "max_tokens" in defaults:
            # A model's max_new_tokens may exceed the context served: the default is a cap,
            # as in the reference (an explicit max_tokens beyond the context is an error).
            defaults["max_tokens"] = min(int(defaults["max_tokens"]), engine.model.max_model_len)
        if "top_k" in defaults:
            defaults["top_k"] = int(defaults["top_k"])
        params = replace(generation.sampling_params, **defaults)
        params.validate()
        generation = replace(generation, sampling_params=params)
    if generation.constraint is not None:
        default = BackendChoice("", config.guided_decoding_backend,
                                config.guided_decoding_options)
        generation = replace(generation,
                             constraint=apply_backend(generation.constraint, default))
    return generation
