"""One JSON value read incrementally and re-written in `json.dumps` form as it arrives.

Streamed tool-call arguments must add up to the arguments of the finished call, which are
`json.dumps(value, ensure_ascii=False)` of what the model wrote. That form is a per-token
rewrite: `{` `[` `}` `]` as they are, `: ` and `, ` between members, each string re-escaped
character by character, each number and literal as Python writes it back. So every text
the model adds can be rewritten the moment it is certain:

    model writes    {"city":"Par        is"}
    sent            {"city": "Par       is"}

A number or a literal (`12` may become `123`, `tr` is not yet `true`) and an escape
sequence (`\\u00` needs two more digits; a high surrogate waits for its pair) are held until
they end. Anything that is not JSON stops the value for good (`failed`); the finished call,
parsed whole, says what is left to send.
"""
from __future__ import annotations

import json
from typing import NamedTuple

# Piece kinds: a container's bracket, an object key's text (quotes included), the ": " and
# ", " between members, a string value's text, a number or literal.
OPEN, CLOSE, KEY, COLON, COMMA, STRING, SCALAR = (
    "open", "close", "key", "colon", "comma", "string", "scalar")


class Piece(NamedTuple):
    kind: str
    # Containers around the piece, not counting a bracket's own: the outer value's brackets
    # are at 0, its members' keys, separators and values at 1.
    level: int
    text: str


_LITERALS = ("true", "false", "null")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                   "t": "\t"}
_WHITESPACE = " \t\r\n"


def _escaped(char: str) -> str:
    """`char` as json.dumps(..., ensure_ascii=False) writes it inside a string."""
    return json.dumps(char, ensure_ascii=False)[1:-1]


class JsonNormalizer:
    """Feed the text of one JSON value (and possibly what follows it); `feed` returns the
    normalized text that became certain. `complete` once the value has ended; `end` is then
    the offset, in everything fed, just past the value."""

    def __init__(self) -> None:
        # Open containers: "{" or "[", and what each expects next.
        self._stack: list[list[str]] = []
        self._scalar: str | None = None  # number or literal text being collected
        self._in_string = False
        self._escape: str | None = None  # text after a backslash, until the escape ends
        self._high_surrogate: str | None = None
        self._fed = 0
        self._started = False
        self.complete = False
        self.failed = False
        self.end = -1
        self._ended_before = False  # the value ended at the character before the last one

    def feed(self, text: str) -> str:
        return "".join(piece.text for piece in self.pieces(text))

    def pieces(self, text: str) -> list[Piece]:
        """`feed`, as pieces that say what each part of the text is and how deep it lies."""
        out: list[Piece] = []
        for offset, char in enumerate(text):
            if self.complete or self.failed:
                break
            if not self._step(char, out):
                self.failed = True
                break
            if self.complete:
                self.end = self._fed + offset + (0 if self._ended_before else 1)
        self._fed += len(text)
        return out

    # -- one character ---------------------------------------------------------------------

    def _step(self, char: str, out: list[Piece]) -> bool:
        if self._in_string:
            return self._string_char(char, out)
        if self._scalar is not None:
            if self._scalar[0] in "-0123456789" and char in _NUMBER_CHARS:
                self._scalar += char
                return True
            if self._scalar[0] not in "-0123456789" and char.isalpha():
                self._scalar += char
                return any(literal.startswith(self._scalar) for literal in _LITERALS)
            if not self._close_scalar(out):
                return False
            if self.complete:  # a bare number at the top level ends before this character
                self._ended_before = True
                return True
        if char in _WHITESPACE:
            return True
        if not self._started or self._expects_value():
            return self._value_start(char, out)
        frame = self._stack[-1]
        expected = frame[1]
        if expected == "key_or_end" and char == "}" or expected == "comma_or_end" and (
                char == "}" and frame[0] == "{" or char == "]" and frame[0] == "["):
            self._pop(char, out)
            return True
        if expected in ("key_or_end", "key") and char == '"':
            frame[1] = "colon_after_key"
            self._in_string = True
            self._emit(out, KEY, '"')
            return True
        if expected == "colon" and char == ":":
            frame[1] = "value"
            self._emit(out, COLON, ": ")
            return True
        if expected == "comma_or_end" and char == ",":
            frame[1] = "key" if frame[0] == "{" else "value"
            self._emit(out, COMMA, ", ")
            return True
        return False

    def _expects_value(self) -> bool:
        return bool(self._stack) and self._stack[-1][1] in ("value", "value_or_end")

    def _value_start(self, char: str, out: list[str]) -> bool:
        self._started = True
        frame = self._stack[-1] if self._stack else None
        if frame is not None and frame[1] == "value_or_end" and char == "]":
            self._pop(char, out)
            return True
        if frame is not None:
            frame[1] = "comma_or_end"
        if char in "{[":
            self._emit(out, OPEN, char)
            self._stack.append([char, "key_or_end" if char == "{" else "value_or_end"])
            return True
        if char == '"':
            self._in_string = True
            self._emit(out, STRING, '"')
            return True
        if char in "-0123456789" or char in "tfn":
            self._scalar = char
            return True
        return False

    def _pop(self, char: str, out: list[Piece]) -> None:
        self._stack.pop()
        self._emit(out, CLOSE, char)
        if not self._stack:
            self.complete = True

    def _emit(self, out: list[Piece], kind: str, text: str) -> None:
        out.append(Piece(kind, len(self._stack), text))

    def _string_kind(self) -> str:
        frame = self._stack[-1] if self._stack else None
        return KEY if frame is not None and frame[1] == "colon_after_key" else STRING

    def _close_scalar(self, out: list[Piece]) -> bool:
        text, self._scalar = self._scalar or "", None
        if text in _LITERALS:
            self._emit(out, SCALAR, text)
        else:
            try:
                number = json.loads(text)
            except ValueError:
                return False
            if not isinstance(number, (int, float)):
                return False
            self._emit(out, SCALAR, json.dumps(number))
        if not self._stack:
            self.complete = True
        return True

    def _string_char(self, char: str, out: list[Piece]) -> bool:
        if self._escape is not None:
            self._escape += char
            return self._escape_step(out)
        if char == "\\":
            self._escape = ""
            return True
        if self._high_surrogate is not None:  # a lone high surrogate, as json.loads keeps it
            self._emit(out, self._string_kind(), self._high_surrogate)
            self._high_surrogate = None
        if char == '"':
            self._in_string = False
            self._emit(out, self._string_kind(), '"')
            frame = self._stack[-1] if self._stack else None
            if frame is not None and frame[1] == "colon_after_key":
                frame[1] = "colon"
            elif frame is None:
                self.complete = True
            return True
        if char < " ":
            return False  # raw control characters are not allowed in JSON strings
        self._emit(out, self._string_kind(), char)
        return True

    def _escape_step(self, out: list[Piece]) -> bool:
        escape = self._escape or ""
        if escape[0] != "u":
            self._escape = None
            if escape not in _SIMPLE_ESCAPES:
                return False
            self._emit_decoded(_SIMPLE_ESCAPES[escape], out)
            return True
        if len(escape) < 5:
            return all(c in "0123456789abcdefABCDEF" for c in escape[1:])
        self._escape = None
        code = int(escape[1:], 16)
        if 0xD800 <= code <= 0xDBFF:
            if self._high_surrogate is not None:
                self._emit(out, self._string_kind(), self._high_surrogate)
            self._high_surrogate = chr(code)
            return True
        if 0xDC00 <= code <= 0xDFFF and self._high_surrogate is not None:
            high, self._high_surrogate = ord(self._high_surrogate), None
            self._emit_decoded(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)), out)
            return True
        self._emit_decoded(chr(code), out)
        return True

    def _emit_decoded(self, char: str, out: list[Piece]) -> None:
        if self._high_surrogate is not None:
            self._emit(out, self._string_kind(), self._high_surrogate)
            self._high_surrogate = None
        self._emit(out, self._string_kind(), _escaped(char))

    def finish(self) -> str:
        """No more text: a bare top-level number or literal ends here."""
        out: list[Piece] = []
        if not self.complete and not self.failed and self._scalar is not None \
                and not self._stack and not self._close_scalar(out):
            self.failed = True
            return ""
        if self.complete and self.end < 0:
            self.end = self._fed
        return "".join(piece.text for piece in out)
