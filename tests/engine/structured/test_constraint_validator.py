"""The serving side's constraint check (engine.structured.validator): the backend's grammar
check with no tokenizer, token table or matcher (those belong to the engine core), on a
large-stack worker thread rather than the event loop, naming the field as the core's compile
does; constraints that passed are remembered."""
from __future__ import annotations

import asyncio
import threading

import pytest

from engine.errors import InvalidRequestError
from engine.structured import validator as validator_module
from engine.structured.constraint import OutputConstraint
from engine.structured.validator import ConstraintValidator


@pytest.mark.parametrize(
    ("constraint", "field", "reason"),
    [
        (OutputConstraint(regex="(abc"), "constraint.regex", "unclosed group"),
        (OutputConstraint(json_schema="{not json"), "constraint.json_schema", "not valid JSON"),
        (OutputConstraint(json_schema='{"type": "nope"}'), "constraint.json_schema", "nope"),
        (OutputConstraint(json_schema="[1]"), "constraint.json_schema", "JSON object"),
        (OutputConstraint(grammar="start: missing_rule"), "constraint.grammar", "missing_rule"),
        (OutputConstraint(regex="a", backend="outlines"), "constraint.backend", "unknown"),
    ],
)
def test_bad_constraints_fail_naming_the_field(
    constraint: OutputConstraint, field: str, reason: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(ConstraintValidator().check(constraint))
    assert info.value.field == field and reason in info.value.message


def test_checks_run_off_the_event_loop_and_are_remembered(monkeypatch) -> None:
    threads: list[str] = []
    check = validator_module.validate_with_backend

    def recording(name: str, constraint: OutputConstraint) -> None:
        threads.append(threading.current_thread().name)
        check(name, constraint)

    monkeypatch.setattr(validator_module, "validate_with_backend", recording)
    validator = ConstraintValidator()

    async def run() -> None:
        for _ in range(3):
            await validator.check(OutputConstraint(regex="[ab]+"))
        await validator.check(OutputConstraint(choice=("[ab]+",)))  # another key

    asyncio.run(run())
    assert threads == ["grammar-validate"] * 2
    validator.close()


def test_a_deeply_nested_grammar_is_checked_without_overflowing_a_stack() -> None:
    depth = 3000  # overflows a default 8 MiB thread stack inside the library
    lark = "start: r0\n" + "\n".join(f'r{i}: "(" r{i + 1} ")"' for i in range(depth))
    lark += f'\nr{depth}: "x"'
    asyncio.run(ConstraintValidator().check(OutputConstraint(grammar=lark)))
