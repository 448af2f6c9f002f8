"""Implementation registry: each op name maps impl names ("xla", "pallas", ...) to functions.

`auto` asks the op's chooser (`set_chooser`) where it has one, else picks the first registered
impl whose `auto_if(...)` accepts the call, falling back to "xla"; the choice is logged once per
(op, shape signature) so a fallback is never silent."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("framework.ops")

_IMPLS: dict[str, dict[str, Callable[..., Any]]] = {}
_AUTO_ORDER: dict[str, list[tuple[str, Callable[..., bool]]]] = {}
_CHOOSERS: dict[str, Callable[..., tuple[str, str]]] = {}
_LOGGED: set[tuple] = set()


def register(
    op: str, impl: str, fn: Callable[..., Any], auto_if: Callable[..., bool] | None = None
) -> None:
    """Register `fn` as `impl` of `op`; with `auto_if`, `auto` prefers it where that says yes."""
    _IMPLS.setdefault(op, {})[impl] = fn
    if auto_if is not None:
        _AUTO_ORDER.setdefault(op, []).append((impl, auto_if))


def set_chooser(op: str, chooser: Callable[..., tuple[str, str]]) -> None:
    """`auto` for `op` calls chooser(*args, **kwargs) -> (impl, why) instead of the auto_if list."""
    _CHOOSERS[op] = chooser


def impls(op: str) -> list[str]:
    return sorted(_IMPLS.get(op, {})) + ["auto"]


def resolve(op: str, impl: str, signature: tuple, *args, **kwargs) -> Callable[..., Any]:
    """The function for `impl` of `op`; `signature` (shapes, dtypes) keys the auto log."""
    table = _IMPLS[op]
    if impl == "auto":
        if op in _CHOOSERS:
            chosen, why = _CHOOSERS[op](*args, **kwargs)
        else:
            ok = (name for name, ok in _AUTO_ORDER.get(op, []) if ok(*args, **kwargs))
            chosen = next(ok, None)
            why = "its kernel supports the call on this target"
            if chosen is None:
                chosen, why = "xla", "no kernel takes this call on this target"
        key = (op, chosen, signature)
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.info("ops.%s: impl=auto chose %s for %s (%s)", op, chosen, signature, why)
        impl = chosen
    if impl not in table:
        raise ValueError(f"ops.{op}: unknown impl {impl!r}; expected one of {impls(op)}")
    return table[impl]
