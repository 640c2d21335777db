"""The engine core process's command reader and the core's request intake: requests with an
output constraint get their matchers from the core's own compiler before they reach the step
loop's inbox; one aborted while compiling never does; a constraint that cannot be compiled
there ends its request with a reason, and the error the serving side raises, instead of
leaving it waiting. Real sockets, a real grammar compiler."""
from __future__ import annotations

import socket
import threading
import time
from multiprocessing.connection import Connection

import pytest
from model_factory import make_tiny_tokenizer

from engine.core.core_request import CoreRequest
from engine.core.loop import AbortRequests, AddCompiled, AddRequests, Inbox
from engine.core.messages import CoreOutputs
from engine.core.process_main import _Channel, _CommandReader
from engine.core.request import FinishReason
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.structured.compiler import GrammarCompiler
from engine.structured.constraint import OutputConstraint
from engine.structured.grammar import TokenizerInfo


@pytest.fixture()
def link():
    """(serving side's end, the core's channel) of a real socket pair."""
    ours, theirs = socket.socketpair()
    serving = Connection(ours.detach())
    channel = _Channel(Connection(theirs.detach()))
    yield serving, channel
    serving.close()
    channel.conn.close()


def _compiler() -> GrammarCompiler:
    tokenizer = make_tiny_tokenizer()
    return GrammarCompiler(TokenizerInfo(tokenizer, len(tokenizer), (1,)))


def _constrained(request_id: str, constraint: OutputConstraint) -> CoreRequest:
    return CoreRequest(request_id, (5, 6), SamplingParams(max_tokens=4), max_tokens=4,
                       constraint=constraint)


def _grammars_of(command) -> dict:
    """request id -> the matcher the step loop would build its Request with."""
    if isinstance(command, AddCompiled):
        return {r.request_id: g for r, g in zip(command.requests, command.grammars, strict=True)}
    assert isinstance(command, AddRequests)
    return {r.request_id: None for r in command.requests}


def _next_command(inbox: Inbox, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        command = inbox.get(block=True)
        if command is not None:
            return command
    raise AssertionError("nothing reached the inbox")


def test_constrained_requests_reach_the_inbox_with_their_own_matchers(link) -> None:
    serving, channel = link
    inbox = Inbox()
    reader = _CommandReader(channel, inbox, _compiler(), on_disconnect=lambda: None)
    threading.Thread(target=reader.run, daemon=True).start()
    choices = [_constrained(f"r-{i}", OutputConstraint(regex="(yes|no)")) for i in range(2)]
    plain = CoreRequest("p", (5,), SamplingParams(max_tokens=2), max_tokens=2)
    serving.send(AddRequests(choices))
    serving.send(AddRequests([plain]))
    received = {k: g for _ in range(2) for k, g in _grammars_of(_next_command(inbox)).items()}
    assert set(received) == {"r-0", "r-1", "p"}
    assert received["p"] is None
    matchers = [received[f"r-{i}"] for i in range(2)]
    assert all(m is not None for m in matchers) and matchers[0] is not matchers[1]
    # The matcher follows the regex: "y" can start the output, and a finished one is done.
    assert not matchers[0].is_terminated


def test_a_request_aborted_while_compiling_never_reaches_the_step_loop(link) -> None:
    serving, channel = link
    inbox = Inbox()
    compiler = _compiler()
    gate = threading.Event()
    compiler.submit(gate.wait)  # holds the compile thread, as a slow grammar would
    reader = _CommandReader(channel, inbox, compiler, on_disconnect=lambda: None)
    threading.Thread(target=reader.run, daemon=True).start()
    serving.send(AddRequests([_constrained("slow", OutputConstraint(regex="a+"))]))
    serving.send(AbortRequests(["slow"], FinishReason.CANCELLED))
    abort = _next_command(inbox)
    assert isinstance(abort, AbortRequests) and abort.request_ids == ["slow"]
    gate.set()
    compiler.submit(lambda: None).result(30)  # the compile job ran meanwhile
    assert inbox.get(block=False) is None


def test_without_a_compiler_the_request_ends_with_the_reason(link) -> None:
    serving, channel = link
    reader = _CommandReader(channel, Inbox(), None,  # an embedding model's core
                            on_disconnect=lambda: None)
    threading.Thread(target=reader.run, daemon=True).start()
    serving.send(AddRequests([_constrained("g", OutputConstraint(regex="a+"))]))
    assert serving.poll(30)
    message = serving.recv()
    assert isinstance(message, CoreOutputs)
    (output,) = message.outputs
    assert output.request_id == "g" and output.finish_reason is FinishReason.ABORT
    assert "not available" in output.finish_message
    # What the serving side raises before the stream starts: INVALID_ARGUMENT, the field.
    assert isinstance(output.error, InvalidRequestError) and output.error.field == "constraint"


def test_a_constraint_that_fails_in_the_core_comes_back_as_the_backend_error(link) -> None:
    """The serving side's check has no tokenizer; whatever only the core's compile finds
    reaches the serving side as the same typed error a compile there used to raise."""
    serving, channel = link
    reader = _CommandReader(channel, Inbox(), _compiler(), on_disconnect=lambda: None)
    threading.Thread(target=reader.run, daemon=True).start()
    serving.send(AddRequests([_constrained(f"b-{i}", OutputConstraint(regex="(abc"))
                              for i in range(2)]))
    assert serving.poll(30)
    message = serving.recv()
    assert [o.request_id for o in message.outputs] == ["b-0", "b-1"]
    for output in message.outputs:
        assert isinstance(output.error, InvalidRequestError)
        assert output.error.field == "constraint.regex"
        assert "unclosed group" in output.error.message


@pytest.mark.e2e
def test_a_core_process_whose_server_dies_while_it_loads_exits(tiny_llama_dir) -> None:
    """The serving side sends CoreStart and goes away before the model is loaded: the core
    process must not load on (a large model takes minutes) and then fail; it exits at once."""
    import subprocess
    import sys

    from engine.config import EngineConfig, ModelConfig
    from engine.core.messages import CoreStart

    ours, theirs = socket.socketpair()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.core.process_main", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, text=True,
    )
    theirs.close()
    serving = Connection(ours.detach())
    serving.send(CoreStart(EngineConfig(model=ModelConfig(model=str(tiny_llama_dir))), None, 30))
    serving.close()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
