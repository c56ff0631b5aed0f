"""Structural limits on request values that reach the chat template.

Tool inputs and schemas are free-form JSON that the chat template walks recursively (and
``tojson`` serializes recursively). A value nested a few hundred levels deep is still valid JSON
for the parser but exhausts Python's recursion limit while rendering, which used to surface as a
500. Such values are refused up front as a 400 instead.
"""
from __future__ import annotations

from typing import Any

MAX_NESTING = 100   # far deeper than any real tool schema or argument object


def nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """Depth of nested lists/dicts in ``value`` (a scalar is 0), counted without recursion;
    stops counting once ``limit`` is exceeded."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


def check_nesting(value: Any, what: str, limit: int = MAX_NESTING) -> Any:
    """``value`` unchanged, or ValueError (a 400 once it reaches the API) when nested too deeply."""
    if nesting_depth(value, limit) > limit:
        raise ValueError(f"{what} is nested more than {limit} levels deep")
    return value
