"""StopStringMatcher: stops within and across deltas, inclusion, several stops, flush."""
from __future__ import annotations

import random

import pytest

from engine.tokenizer import StopStringMatcher


def _run(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, str | None]:
    """Feed deltas until a stop matches; return (all emitted text, matched stop)."""
    emitted = []
    for delta in deltas:
        text, stop = matcher.feed(delta)
        emitted.append(text)
        if stop is not None:
            return "".join(emitted), stop
    emitted.append(matcher.flush())
    return "".join(emitted), None


def _random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6))))
    return [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)])]


def test_stop_inside_one_delta_cuts_before_it() -> None:
    matcher = StopStringMatcher(("END",), include_stop_str_in_output=False)
    assert matcher.feed("one two END three") == ("one two ", "END")
    assert matcher.matched == "END"


def test_stop_inside_one_delta_included_when_asked() -> None:
    matcher = StopStringMatcher(("END",), include_stop_str_in_output=True)
    assert matcher.feed("one two END three") == ("one two END", "END")


@pytest.mark.parametrize("include", [False, True])
def test_stop_spanning_deltas_is_found(include: bool) -> None:
    matcher = StopStringMatcher(("</answer>",), include_stop_str_in_output=include)
    assert matcher.feed("yes </an") == ("yes ", None)
    assert matcher.feed("sw") == ("", None)
    text, stop = matcher.feed("er> and more")
    assert stop == "</answer>"
    assert text == ("</answer>" if include else "")


def test_nothing_is_emitted_after_a_match() -> None:
    matcher = StopStringMatcher(("\n\n",), include_stop_str_in_output=False)
    assert matcher.feed("a\n") == ("a", None)
    assert matcher.feed("\nb") == ("", "\n\n")
    assert matcher.feed("more text") == ("", None)
    assert matcher.flush() == ""


def test_held_text_is_only_a_possible_stop_prefix() -> None:
    matcher = StopStringMatcher(("abcd",), include_stop_str_in_output=False)
    # "xab" ends with "ab", a prefix of the stop: only that is held (at most len - 1 chars).
    assert matcher.feed("xab") == ("x", None)
    # "abx" cannot start a stop any more: released together with the new text.
    assert matcher.feed("x") == ("abx", None)
    assert matcher.feed("abc") == ("", None)
    assert matcher.flush() == "abc"


def test_earliest_stop_wins_among_several() -> None:
    matcher = StopStringMatcher(("world", "lo w"), include_stop_str_in_output=True)
    assert matcher.feed("hello world") == ("hello w", "lo w")


def test_stop_completing_first_wins_whatever_the_split() -> None:
    # "y" completes before "xyz" in the character stream, so it wins however text arrives.
    rng = random.Random(7)
    for _ in range(50):
        matcher = StopStringMatcher(("xyz", "y"), include_stop_str_in_output=True)
        assert _run(matcher, _random_split("axyzb", rng)) == ("axy", "y")


def test_same_end_prefers_longest_stop() -> None:
    matcher = StopStringMatcher(("cd", "bcd"), include_stop_str_in_output=False)
    assert matcher.feed("abcde") == ("a", "bcd")


def test_no_match_flush_releases_everything() -> None:
    text = "the stop string never quite app"
    matcher = StopStringMatcher(("appears",), include_stop_str_in_output=False)
    emitted = "".join(matcher.feed(delta)[0] for delta in ["the stop string ", "never quite app"])
    assert emitted == "the stop string never quite "
    assert emitted + matcher.flush() == text
    assert matcher.matched is None


def test_without_stops_text_passes_through() -> None:
    matcher = StopStringMatcher((), include_stop_str_in_output=False)
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""


@pytest.mark.parametrize("include", [False, True])
def test_random_splits_agree_with_a_plain_search(include: bool) -> None:
    rng = random.Random(2024)
    stops = ("ab", "cab", "bba", "é🙂")
    alphabet = "abc é🙂"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        matcher = StopStringMatcher(stops, include_stop_str_in_output=include)
        emitted, stop = _run(matcher, _random_split(text, rng))
        # Reference: scan the text one character at a time for the first stop to complete.
        expected_text, expected_stop = text, None
        for end in range(1, len(text) + 1):
            completed = [s for s in stops if text[:end].endswith(s)]
            if completed:
                expected_stop = max(completed, key=len)
                cut = end if include else end - len(expected_stop)
                expected_text = text[:cut]
                break
        assert (emitted, stop) == (expected_text, expected_stop), text


def test_empty_stop_is_rejected() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(("",), include_stop_str_in_output=False)
