"""JsonNormalizer against json.dumps(json.loads(text), ensure_ascii=False): any JSON value, in
any spelling (spacing, escapes, number forms), cut anywhere, adds up to exactly that text, and
each piece is sent as soon as it is certain; text that is not JSON stops it."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.output_parsing.tool_parsers.json_stream import JsonNormalizer

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


def _spell(value, style: int) -> str:
    """The same value as different writers write it."""
    if style == 0:
        return json.dumps(value, ensure_ascii=False)
    if style == 1:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return json.dumps(value, ensure_ascii=True, indent=2)


def _normalized(text: str, cuts: list[int]) -> tuple[str, JsonNormalizer]:
    normalizer = JsonNormalizer()
    pieces, start = [], 0
    for cut in sorted(cuts) + [len(text)]:
        pieces.append(normalizer.feed(text[start:cut]))
        start = cut
    pieces.append(normalizer.finish())
    return "".join(pieces), normalizer


@settings(max_examples=300, deadline=None)
@given(value=_values, style=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_any_value_in_any_spelling_and_cut_adds_up_to_json_dumps(value, style, seed) -> None:
    text = _spell(value, style)
    cuts = random.Random(seed).sample(range(len(text) + 1), min(len(text), 6))
    normalized, normalizer = _normalized(text + " trailing", cuts)
    assert normalized == json.dumps(json.loads(text), ensure_ascii=False)
    assert normalizer.complete and not normalizer.failed
    assert normalizer.end == len(text) or not isinstance(value, (dict, list, str))


def test_pieces_are_sent_as_soon_as_they_are_certain() -> None:
    normalizer = JsonNormalizer()
    assert normalizer.feed('{"city":"Par') == '{"city": "Par'
    assert normalizer.feed('is","days":1') == 'is", "days": '  # 1 may become 12
    assert normalizer.feed("2,") == "12, "
    assert normalizer.feed('"t": "\\u00') == '"t": "'  # the escape is not finished
    assert normalizer.feed('e9\\ud83d') == "é"  # the high surrogate waits for its pair
    assert normalizer.feed('\\ude00"}') == '😀"}'
    assert normalizer.complete and normalizer.end == len(
        '{"city":"Paris","days":12,"t": "\\u00e9\\ud83d\\ude00"}')


@pytest.mark.parametrize("text", ['{"a" 1}', '{"a": tru}', '{"a": 01}', "{'a': 1}", '["a",]',
                                  '{"a": "line\nbreak"}', '{"a": NaN}', '{"a": "\\x"}'])
def test_text_that_is_not_json_stops_it(text: str) -> None:
    normalizer = JsonNormalizer()
    normalizer.feed(text)
    normalizer.finish()
    assert normalizer.failed and not normalizer.complete
