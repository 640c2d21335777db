"""The reasoning gate on a real llguidance matcher and a tokenizer with think tokens: every
token allowed until `</think>` is generated, the constraint's mask after it, the start
state read from the prompt's end, and rollback across the end marker."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from thinking_model import build_thinking_model, think_token_ids
from transformers import AutoTokenizer

from engine.sampling.grammar_mask import fill_grammar_bitmask, unpack_bitmask
from engine.structured.compiler import GrammarCompiler
from engine.structured.constraint import GateState, OutputConstraint, ReasoningGate
from engine.structured.grammar import TokenizerInfo


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_thinking_model(tmp_path_factory.mktemp("thinking"))


@pytest.fixture(scope="module")
def compiler(thinking_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(thinking_dir)
    compiler = GrammarCompiler(TokenizerInfo(tokenizer, len(tokenizer), (tokenizer.eos_token_id,)))
    yield compiler, tokenizer
    compiler.close()


def _allowed(grammar, vocab_size: int) -> torch.Tensor:
    return unpack_bitmask(fill_grammar_bitmask([grammar], vocab_size), vocab_size)[0]


def _prompt(tokenizer, enable_thinking: bool) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Capital?"}],
                                         tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


def test_constraint_waits_for_the_end_of_reasoning(compiler, thinking_dir: Path) -> None:
    compiler, tokenizer = compiler
    start, end = think_token_ids(thinking_dir)
    gate = ReasoningGate(end, start)
    constraint = OutputConstraint(choice=("Paris", "Rome"), reasoning=gate)
    (grammar,) = compiler.new_grammars(constraint, 1, _prompt(tokenizer, True))
    vocab = len(tokenizer)
    assert grammar.state is GateState.REASONING
    # Inside the reasoning every token is allowed, and nothing reaches the matcher.
    assert bool(_allowed(grammar, vocab).all())
    reasoning = tokenizer.encode(" hmm, Berlin? no", add_special_tokens=False)
    assert grammar.accept_tokens(reasoning)
    assert grammar.accept_token(end) and grammar.state is GateState.ENDED
    # After </think>: exactly what the choice constraint allows.
    plain = compiler.new_grammars(OutputConstraint(choice=("Paris", "Rome")), 1)[0]
    assert torch.equal(_allowed(grammar, vocab), _allowed(plain, vocab))
    assert not bool(_allowed(grammar, vocab)[tokenizer.encode(" hmm", add_special_tokens=False)[0]])
    assert grammar.accept_tokens(tokenizer.encode("Rome", add_special_tokens=False))
    assert grammar.is_terminated
    # Rolling back past the end marker reopens the reasoning.
    grammar.rollback(len(tokenizer.encode("Rome", add_special_tokens=False)) + 1)
    assert grammar.state is GateState.REASONING and not grammar.is_terminated


def test_thinking_switched_off_in_the_prompt_constrains_from_the_first_token(
    compiler, thinking_dir: Path
) -> None:
    compiler, tokenizer = compiler
    start, end = think_token_ids(thinking_dir)
    constraint = OutputConstraint(choice=("Paris", "Rome"), reasoning=ReasoningGate(end, start))
    (grammar,) = compiler.new_grammars(constraint, 1, _prompt(tokenizer, False))
    assert grammar.state is GateState.ENDED
    assert not bool(_allowed(grammar, len(tokenizer))[end])


def test_undecided_start_allows_opening_a_block_or_the_answer(compiler, thinking_dir) -> None:
    compiler, tokenizer = compiler
    start, end = think_token_ids(thinking_dir)
    constraint = OutputConstraint(choice=("Paris", "Rome"), reasoning=ReasoningGate(end, start))
    prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    (grammar,) = compiler.new_grammars(constraint, 1, prompt)
    assert grammar.state is GateState.UNDECIDED
    plain = compiler.new_grammars(OutputConstraint(choice=("Paris", "Rome")), 1)[0]
    expected = _allowed(plain, len(tokenizer)).clone()
    expected[start] = True
    assert torch.equal(_allowed(grammar, len(tokenizer)), expected)
    (answer,) = compiler.new_grammars(constraint, 1, prompt)
    assert answer.accept_tokens(tokenizer.encode("Paris", add_special_tokens=False))
    assert answer.state is GateState.ENDED and answer.is_terminated
    assert grammar.accept_token(start) and grammar.state is GateState.REASONING
