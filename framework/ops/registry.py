"""Implementation registry: each op name maps impl names ("xla", "pallas", ...) to functions.

`auto` picks the first registered impl whose `supports(...)` accepts the call, falling back to
"xla"; the choice is logged once per (op, shape signature) so a fallback is never silent."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("framework.ops")

_IMPLS: dict[str, dict[str, Callable[..., Any]]] = {}
_AUTO_ORDER: dict[str, list[tuple[str, Callable[..., bool]]]] = {}
_LOGGED: set[tuple] = set()


def register(
    op: str, impl: str, fn: Callable[..., Any], auto_if: Callable[..., bool] | None = None
) -> None:
    """Register `fn` as `impl` of `op`; with `auto_if`, `auto` prefers it where that says yes."""
    _IMPLS.setdefault(op, {})[impl] = fn
    if auto_if is not None:
        _AUTO_ORDER.setdefault(op, []).append((impl, auto_if))


def impls(op: str) -> list[str]:
    return sorted(_IMPLS.get(op, {})) + ["auto"]


def resolve(op: str, impl: str, signature: tuple, *args, **kwargs) -> Callable[..., Any]:
    """The function for `impl` of `op`; `signature` (shapes, dtypes) keys the auto log."""
    table = _IMPLS[op]
    if impl == "auto":
        chosen = "xla"
        for name, ok in _AUTO_ORDER.get(op, []):
            if ok(*args, **kwargs):
                chosen = name
                break
        key = (op, chosen, signature)
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.info("ops.%s: impl=auto chose %s for %s", op, chosen, signature)
        impl = chosen
    if impl not in table:
        raise ValueError(f"ops.{op}: unknown impl {impl!r}; expected one of {impls(op)}")
    return table[impl]
