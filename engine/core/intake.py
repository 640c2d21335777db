"""Where commands enter the engine core, in either mode (its own process, or a step thread):

    AddRequests, no constraint -------------------------------------------> inbox
    AddRequests with constraints --> grammar compile thread: matchers --> inbox (AddCompiled)
                                          `-- compile failure --> report(RequestOutput(error))
    AbortRequests --> forgets requests still compiling ---------------------> inbox

The core owns guided decoding: one GrammarCompiler with the one token table, built where the
core runs (engine.core.build.make_grammar_compiler), and every matcher. A grammar compiles on
the compiler's own worker thread, so the step thread keeps stepping the others meanwhile; a
request aborted while it compiles never reaches the inbox. A constraint that fails here (the
serving side only validated it) is reported as the request's one output, carrying the error
the serving side raises before its stream starts.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.core.core_request import CoreRequest
from engine.core.loop import AbortRequests, AddCompiled, AddRequests, CoreCommand, Inbox
from engine.core.outputs import RequestOutput
from engine.core.request import FinishReason
from engine.errors import EngineError, InvalidRequestError

if TYPE_CHECKING:
    from engine.structured.compiler import GrammarCompiler
    from engine.structured.constraint import OutputConstraint
    from engine.structured.grammar import Grammar


class RequestIntake:
    """Commands -> the step loop's inbox. `report` receives the outputs of requests that
    failed to compile (on the compile thread, or the caller's when there is no compiler)."""

    def __init__(
        self,
        inbox: Inbox,
        compiler: GrammarCompiler | None,
        report: Callable[[list[RequestOutput]], None],
    ) -> None:
        self.inbox = inbox
        self.compiler = compiler
        self.report = report
        self._lock = threading.Lock()
        self._compiling: set[str] = set()  # request ids whose grammars are being built

    def put(self, command: CoreCommand) -> None:
        if isinstance(command, AddRequests) and any(
            r.constraint is not None for r in command.requests
        ):
            self._compile_then_add(command.requests)
            return
        if isinstance(command, AbortRequests):
            with self._lock:
                self._compiling.difference_update(command.request_ids)
        self.inbox.put(command)

    def close(self) -> None:
        if self.compiler is not None:
            self.compiler.close()  # a warm-up still running may fail now; that is no news

    def _compile_then_add(self, requests: list[CoreRequest]) -> None:
        with self._lock:
            self._compiling.update(r.request_id for r in requests)

        def job() -> None:
            failure: BaseException | None = None
            grammars: list[Grammar | None] = []
            try:
                grammars = compile_grammars(self.compiler, requests)
            except Exception as exc:  # noqa: BLE001 - the request fails, the engine goes on
                failure = exc
            with self._lock:
                live = [i for i, r in enumerate(requests) if r.request_id in self._compiling]
                self._compiling.difference_update(requests[i].request_id for i in live)
            if failure is None:
                if live:
                    self.inbox.put(AddCompiled([requests[i] for i in live],
                                               [grammars[i] for i in live]))
                return
            error = failure if isinstance(failure, EngineError) else EngineError(
                f"the output constraint failed to compile: {failure!r}")
            self.report([
                RequestOutput(requests[i].request_id, [], FinishReason.ABORT,
                              num_prompt_tokens=requests[i].num_prompt_tokens,
                              finish_message=f"the output constraint failed to compile: {failure}",
                              error=error)
                for i in live
            ])

        if self.compiler is None:
            job()
        else:
            self.compiler.submit(job)


def compile_grammars(
    compiler: GrammarCompiler | None, requests: list[CoreRequest]
) -> list[Grammar | None]:
    """One matcher per request with a constraint, None for the others. Each distinct
    constraint compiles once (the n choices of a request share theirs). Raises
    InvalidRequestError naming the constraint's field for one the backend rejects."""
    by_constraint: dict[OutputConstraint, list[int]] = {}
    for index, request in enumerate(requests):
        if request.constraint is not None:
            by_constraint.setdefault(request.constraint, []).append(index)
    grammars: list[Grammar | None] = [None] * len(requests)
    if by_constraint and compiler is None:
        raise InvalidRequestError(
            "guided decoding is not available for this model", field="constraint"
        )
    for constraint, indices in by_constraint.items():
        if constraint.reasoning is not None:
            # Gated matchers start where each request's prompt leaves the reasoning.
            for index in indices:
                grammars[index] = compiler.new_grammars(  # type: ignore[union-attr]
                    constraint, 1, requests[index].prompt_token_ids)[0]
            continue
        for index, grammar in zip(indices, compiler.new_grammars(constraint, len(indices)),  # type: ignore[union-attr]
                                  strict=True):
            grammars[index] = grammar
    return grammars
