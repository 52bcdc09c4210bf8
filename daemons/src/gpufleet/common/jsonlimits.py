"""JSON from untrusted peers, with a nesting limit.

Python's ``json`` recurses once per level: a body of a few thousand ``[`` raises
``RecursionError`` deep in a handler (a 500, or a dead reconciler cycle when it is a
worker's ``/readyz``). :func:`loads` refuses anything nested deeper than ``max_depth``
with a ``ValueError`` before parsing, so every caller turns it into its own clear 400.
"""

from __future__ import annotations

import json
import re

MAX_DEPTH = 32

# strings (with their escapes) cannot hold structure: drop them before counting brackets
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


class TooDeep(ValueError):
    """The document nests deeper than allowed."""


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays/objects in ``data`` (a JSON text; strings ignored)."""
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def check_depth(data: bytes | str, max_depth: int = MAX_DEPTH) -> None:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    # fast path: fewer opening brackets than the limit cannot nest deeper than it
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return
    if nesting_depth(raw) > max_depth:
        raise TooDeep(f"the JSON nests deeper than {max_depth} levels")


def loads(data: bytes | str, max_depth: int = MAX_DEPTH):
    """``json.loads`` that raises ``ValueError`` (``TooDeep`` for nesting) on any bad input."""
    check_depth(data, max_depth)
    try:
        return json.loads(data)
    except RecursionError:  # a limit above the interpreter's: still a bad document
        raise TooDeep("the JSON nests too deep") from None
