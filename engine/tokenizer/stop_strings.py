"""Stop strings over a stream of text deltas.

The matcher sees text as it is detokenized and must never emit text that a later delta could
turn into part of a stop string. It therefore holds back the longest tail of what it has seen
that is a proper prefix of some stop string (at most `max(len(stop)) - 1` characters).

Which stop wins: the one that *completes* first in the character stream, and among stops
completing at the same character the longest (it starts earliest). This is the answer a
character-at-a-time matcher gives, so the result does not depend on how the text was split
into deltas. Consequently the emitted text never contains a complete stop string.
"""
from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...], include_stop_str_in_output: bool) -> None:
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = stops
        self._include_stop = include_stop_str_in_output
        self._max_hold = max((len(stop) for stop in stops), default=1) - 1
        # Seen but not yet emitted; never contains a complete stop string.
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream, once one has."""
        return self._matched

    def feed(self, text_delta: str) -> tuple[str, str | None]:
        """Consume a delta; return (text safe to emit now, the stop string matched or None).

        After a match every later call returns ("", None): nothing past the stop is emitted.
        """
        if self._matched is not None:
            return "", None
        if not self._stops:
            return text_delta, None
        text = self._held + text_delta
        match = self._first_completed_stop(text)
        if match is not None:
            start, stop = match
            self._matched = stop
            self._held = ""
            end = start + len(stop) if self._include_stop else start
            return text[:end], stop
        hold = self._partial_stop_length(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], None

    def flush(self) -> str:
        """Release held text when the request ends for another reason (EOS, length)."""
        released, self._held = self._held, ""
        return released if self._matched is None else ""

    def _first_completed_stop(self, text: str) -> tuple[int, str] | None:
        """(start index, stop) of the stop completing earliest in `text`, longest on ties."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop): min is the winner
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), -len(stop), stop)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        end, _, stop = best
        return end - len(stop), stop

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop."""
        for length in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[len(text) - length :]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
