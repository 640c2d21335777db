"""`\\d`, `\\w` and `\\s` in a guided regex mean their ASCII classes, as in JSON Schema's
ECMAScript patterns and in the reference server's default backends; the regex engines under
llguidance read them as Unicode classes (`\\d` would accept Arabic-Indic digits)."""
from __future__ import annotations

# The class bodies, usable inside brackets as well as in a bracket of their own.
_ASCII_CLASSES = {"d": "0-9", "w": "A-Za-z0-9_", "s": " \\t\\n\\r\\f\\v"}


def ascii_class_escapes(regex: str) -> str:
    """`regex` with `\\d \\w \\s` (and `\\D \\W \\S` outside brackets) spelled as ASCII
    classes. Other escapes (`\\\\d` included) pass through; a negated class inside brackets,
    which has no one-bracket ASCII spelling, is left as written."""
    out: list[str] = []
    i, in_brackets = 0, False
    while i < len(regex):
        char = regex[i]
        if char == "\\" and i + 1 < len(regex):
            escaped = regex[i + 1]
            body = _ASCII_CLASSES.get(escaped.lower())
            negated = escaped.isupper()
            if body is not None and not (in_brackets and negated):
                out.append(body if in_brackets else f"[{'^' if negated else ''}{body}]")
            else:
                out.append(regex[i:i + 2])
            i += 2
            continue
        if char == "[" and not in_brackets:
            in_brackets = True
            out.append(char)
            i += 1
            # `[^` negates; a `]` right after `[` or `[^` is a literal member.
            for literal in ("^", "]"):
                if regex[i:i + 1] == literal:
                    out.append(literal)
                    i += 1
            continue
        if char == "]" and in_brackets:
            in_brackets = False
        out.append(char)
        i += 1
    return "".join(out)
