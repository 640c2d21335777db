"""The n-gram proposer against a plain-Python lookup, and --speculative-config validation
(errors name the field, through the real CLI parser)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from engine.spec_decode.config import SpeculativeConfig, parse_speculative_config
from engine.spec_decode.ngram import NgramProposer, find_ngram_continuation
from protoserve.cli.serve import build_parser


def _reference_lookup(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Longest suffix first; its latest earlier occurrence; the k tokens after it, where the
    sequence extended by the proposal itself supplies those past its end."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                extended = list(tokens)
                for i in range(k):
                    extended.append(extended[start + n + i])
                return extended[len(tokens) :]
    return []


def test_lookup_matches_a_plain_python_search_on_random_and_repetitive_sequences() -> None:
    rng = random.Random(0)
    for trial in range(400):
        vocab = rng.choice([3, 5, 50])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        max_n = rng.randrange(1, 6)
        min_n = rng.randrange(1, max_n + 1)
        k = rng.randrange(1, 6)
        expected = _reference_lookup(tokens, k, max_n, min_n)
        got = find_ngram_continuation(np.array(tokens, dtype=np.int64), k, max_n, min_n)
        assert got == expected, (trial, tokens, k, max_n, min_n)


def test_proposer_follows_a_growing_sequence() -> None:
    proposer = NgramProposer(max_n=3, min_n=1)
    tokens = [1, 2, 3, 4, 1, 2]
    assert proposer.propose("r", tokens, 3) == [3, 4, 1]
    # "1 2" after "4": the match's continuation runs past the end and repeats the proposal.
    assert proposer.propose("r", tokens, 6) == [3, 4, 1, 2, 3, 4]
    tokens += [3, 9]
    assert proposer.propose("r", tokens, 2) == []  # 9 never occurred before
    tokens += [1, 2, 3]
    # "1 2 3" last occurred at 6: 4 followed it at first, 9 most recently.
    assert proposer.propose("r", tokens, 2) == [9, 1]
    proposer.forget("r")
    # A loop of period 1 proposes all k tokens.
    assert proposer.propose("r", [5, 5], 4) == [5, 5, 5, 5]
    assert proposer.propose("r", [5, 5, 6, 5, 6], 3) == [5, 6, 5]


def test_config_defaults_and_the_reference_shape() -> None:
    config = parse_speculative_config(
        '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5, '
        '"prompt_lookup_min": 2}'
    )
    assert config == SpeculativeConfig("ngram", 3, 5, 2)
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 2}') == (
        SpeculativeConfig("ngram", 2, 4, 2))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"num_speculative_tokens": 2}', "'method'"),
        ('{"method": "ngram"}', "'num_speculative_tokens'"),
        ('{"method": "medusa", "num_speculative_tokens": 2}', "'method'"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "'num_speculative_tokens'"),
        ('{"method": "ngram", "num_speculative_tokens": "4"}', "'num_speculative_tokens'"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": -1}',
         "'prompt_lookup_max'"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, '
         '"prompt_lookup_max": 2}', "'prompt_lookup_min'"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', "'model'"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "acceptance_floor": 2}',
         "'acceptance_floor'"),
    ],
)
def test_bad_flag_values_fail_start_up_naming_the_field(
    text: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--speculative-config", text])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--speculative-config" in err and field in err, err


def test_flag_value_reaches_the_parsed_arguments() -> None:
    args = build_parser().parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']
    )
    assert args.speculative_config == SpeculativeConfig("ngram", 2)
    assert build_parser().parse_args([]).speculative_config is None
