"""Which sampling settings speculate: those whose output never reports a draft position's
distribution (the verifier does not compute one). Shared by the scheduler's proposals and
the EAGLE head's feed, which keeps only the requests that may be proposed for."""
from __future__ import annotations

from engine.sampling_params import SamplingParams


def params_speculate(params: SamplingParams) -> bool:
    """Logprobs, prompt_logprobs, best_of ranking and beam search (which ranks by logprobs)
    never speculate; everything else does."""
    return (
        params.logprobs is None
        and params.prompt_logprobs is None
        and not params.use_beam_search
        and (params.best_of is None or params.best_of <= params.n)
    )
