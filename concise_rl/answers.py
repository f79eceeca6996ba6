"""Finding the final answer in a piece of LaTeX: the last ``\\boxed{...}``.

Shared by the problem loaders (reference solutions carry their answer in a box)
and the grader (model responses do too), so both read boxes the same way.
"""

from __future__ import annotations

_BOX_OPENERS = ("\\boxed{", "\\fbox{")


def _closing_brace(text: str, open_at: int) -> int | None:
    """Index of the brace closing the one at ``open_at``; escaped ``\\{``/``\\}`` are literal."""
    depth = 0
    i = open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces.

    Returns None when the text has no box. When the last box is never closed (a
    truncated response), an earlier complete box is used if there is one.
    """
    end = len(text)
    while True:
        start = max(text.rfind(opener, 0, end) for opener in _BOX_OPENERS)
        if start == -1:
            return None
        brace = text.index("{", start)
        close = _closing_brace(text, brace)
        if close is not None:
            return text[brace + 1 : close].strip()
        end = start
