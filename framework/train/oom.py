"""Out-of-memory reports that name the layers: when compiling the train step or running a step
fails to allocate, `reported` replaces XLA's wall of text with a short report (exit status 3
through scripts/train.py):

    out of memory on NVIDIA H100 80GB HBM3 at step 12: the step needs ~91.3 GiB per device,
    the device has 79.1 GiB
    XLA: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB.
    largest buffers by layer (...):
       38.0 GiB  41%  transformer/blocks/attn (backward)  [24 buffers]
       ...
    suggestion: set model.remat=full: 52.3 GiB per device, step 950 ms

The headline's need is XLA's own memory analysis of the compiled step (arguments + outputs -
aliased + temporaries, per device); the device's size is the allocator's `bytes_limit` where
jax reports one. The table is a cheap signal, not a live-range simulation: every instruction of
the program whose result is at least `MIN_BYTES` is counted once (a loop body's once, not per
iteration), by the named scope in its metadata (`framework.nn.scope`: transformer/blocks/mlp,
...), with jit/jvp/while wrappers and layer indices stripped and the transposed (backward) pass
marked. Buffers XLA reuses are all counted, so a group's size says where the big arrays are made,
not how many are live at once. Sizes are per device from the compiled (partitioned) program; if
compiling itself failed, from the program before optimization and partitioning (global sizes)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax

from framework.errors import OutOfMemoryError

log = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # instructions with smaller results are left out of the table
TOP = 10  # groups shown
MARKERS = ("RESOURCE_EXHAUSTED", "out of memory")  # case-insensitive, in XLA's message

# bits per element of HLO's element types (pred and the 8-bit floats take a byte)
_BITS = {"pred": 8, "s4": 4, "u4": 4, "f4e2m1fn": 4, "c64": 64, "c128": 128}
# instructions whose result is not a new buffer (aliases, loop and call results, arguments)
_NO_BUFFER = frozenset(
    {
        "parameter",
        "tuple",
        "get-tuple-element",
        "bitcast",
        "while",
        "conditional",
        "call",
        "after-all",
        "opt-barrier",
        "add-dependency",
        "domain",
    }
)
# computations whose instructions allocate (others are fused bodies, reducers, comparators)
_CALLERS = frozenset({"while", "conditional", "call"})
# name-stack entries that are wrappers, not layers
_NOISE = frozenset(
    {
        "while",
        "body",
        "cond",
        "closed_call",
        "eval_jaxpr",
        "core_call",
        "checkpoint",
        "remat",
        "rematted_computation",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "pjit",
        "shard_map",
        "scan",
    }
)
_WRAPPED = re.compile(r"^([\w\-]+)\((.*)\)$")
_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([^\]]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_REFS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)|_computations=\{([^}]*)\}")


class Group(NamedTuple):
    """Buffers of one layer path: their bytes and how many instructions made them."""

    path: str
    bytes: int
    count: int


def is_oom(e: BaseException) -> bool:
    """Whether XLA failed to allocate device memory (compiling or running)."""
    text = str(e)
    return isinstance(e, jax.errors.JaxRuntimeError) and any(
        m.lower() in text.lower() for m in MARKERS
    )


def _split(op_name: str) -> list[str]:
    """The name stack's entries ('/' inside parentheses kept: `jvp(blocks/0)`)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(op_name):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "/" and depth == 0:
            parts.append(op_name[start:i])
            start = i + 1
    parts.append(op_name[start:])
    return parts


def layer_path(op_name: str, depth: int = 3) -> str:
    """The layer an instruction belongs to, from its metadata op_name:
    "jit(wrapped)/transpose(jvp(transformer))/blocks/while/body/closed_call/mlp/up/dot_general"
    -> "transformer/blocks/mlp (backward)". The first entry (the step's jit) and the last (the
    primitive) are dropped, as are wrappers, helper jits, einsum specs and layer indices; the
    path keeps its first `depth` scopes. "(outside any layer scope)" for the rest (optimizer,
    loss...), "(no op name)" for instructions XLA added (copies, layout changes)."""
    if not op_name:
        return "(no op name)"
    entries = _split(op_name.split(";")[0])
    if entries and entries[0].startswith("jit("):
        entries = entries[1:]
    backward, path = False, []
    for entry in entries[:-1]:
        names = []
        for piece in _split(entry):
            while match := _WRAPPED.match(piece):
                backward |= match.group(1) == "transpose"
                if match.group(1) == "jit":  # a library helper (jit(_where), jit(clip))
                    piece = ""
                    break
                piece = match.group(2)
            names.extend(_split(piece) if "/" in piece else [piece])
        path.extend(
            n for n in names if n and _NAME.match(n) and n not in _NOISE and not n.isdigit()
        )
    where = "/".join(path[:depth]) or "(outside any layer scope)"
    return f"{where} (backward)" if backward else where


def _bytes(shape_text: str) -> int:
    """Bytes of an HLO result type: `f32[512,32]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape_text):
        if dtype == "token":
            continue
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
        sizes = [int(d.replace("<=", "")) for d in dims.split(",") if d.strip()]
        total += math.prod(sizes) * bits // 8
    return total


def _result(line: str) -> tuple[str, str, str] | None:
    """(result type, opcode, rest of the line) of one HLO instruction line, or None."""
    head = _INSTRUCTION.match(line)
    if head is None:
        return None
    rest = line[head.end() :]
    if rest.startswith("("):  # a tuple type: up to its closing parenthesis
        depth, end = 0, 0
        while end < len(rest):
            depth += (rest[end] == "(") - (rest[end] == ")")
            end += 1
            if depth == 0:
                break
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, paren, rest = rest.partition("(")
    return (shape, opcode.strip(), rest) if paren else None


def _op_name(rest: str) -> str:
    found = re.search(r'op_name="([^"]*)"', rest)
    return found.group(1) if found else ""


def buffers_by_layer(hlo_text: str, min_bytes: int | None = None) -> list[Group]:
    """Result bytes of the program's instructions, summed by `layer_path`, largest first: only
    computations that allocate (the entry, loop bodies, called computations; not fused bodies
    or reducers), only instructions that make a buffer of at least `min_bytes` (MIN_BYTES).
    Before optimization, a called function's op names are relative to its call (XLA prefixes
    them when it inlines the call): the caller's op name is prefixed here."""
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    entry = None
    for line in hlo_text.splitlines():
        if current is None:
            if (header := _HEADER.match(line)) and "=" not in line.split("(")[0]:
                current = computations.setdefault(header.group(1), [])
                entry = header.group(1) if line.startswith("ENTRY") else entry
        elif line.strip() == "}":
            current = None
        else:
            current.append(line)
    called: dict[str, bool] = {}  # computation -> whether it allocates (reached by a caller)
    call_sites: dict[str, tuple[str, str]] = {}  # callee -> (calling computation, op name)
    for where, lines in computations.items():
        for line in lines:
            if (parsed := _result(line)) is None:
                continue
            for one, many in _REFS.findall(parsed[2]):
                for name in [one] if one else re.findall(r"[\w.\-]+", many):
                    called[name] = called.get(name, False) or parsed[1] in _CALLERS
                    if parsed[1] == "call":
                        call_sites.setdefault(name, (where, _op_name(parsed[2])))
    prefixes: dict[str, str] = {}

    def prefix(name: str, depth: int = 0) -> str:
        if name not in prefixes:
            caller, op = call_sites.get(name, ("", ""))
            outer = prefix(caller, depth + 1) if caller and depth < 50 else ""
            prefixes[name] = "/".join(p for p in (outer, op) if p)
        return prefixes[name]

    groups: dict[str, list[int]] = {}
    for name, lines in computations.items():
        if name != entry and not called.get(name, True):
            continue
        for line in lines:
            parsed = _result(line)
            if parsed is None or parsed[1] in _NO_BUFFER:
                continue
            size = _bytes(parsed[0])
            if size < max(min_bytes, 1):
                continue
            op = _op_name(parsed[2])
            op = "/".join(p for p in (prefix(name), op) if p) if op else ""
            group = groups.setdefault(layer_path(op), [0, 0])
            group[0] += size
            group[1] += 1
    found = [Group(path, size, count) for path, (size, count) in groups.items()]
    return sorted(found, key=lambda g: -g.bytes)


def step_bytes(compiled: Any) -> int | None:
    """Bytes one device needs for the compiled step (XLA's memory analysis), or None."""
    try:
        m = compiled.memory_analysis()
        return int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
    except Exception:  # noqa: BLE001 (a backend without the analysis)
        return None


def _gib(n: int | None) -> str:
    """Bytes for people: GiB, MiB or KiB."""
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size / 10:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


GENERIC_SUGGESTION = (
    "recompute activations (model.remat=full), shard params and optimizer state over the "
    "devices (mesh.fsdp), or lower data.batch_size and raise train.grad_accum to keep the "
    "tokens per step"
)


@dataclasses.dataclass(frozen=True)
class Report:
    """What an out-of-memory report says; `render` writes it. The advice (a predicted need when
    the step did not compile, the cheapest change that fits) comes from framework.estimate,
    which scripts/train.py asks: this package sits below it."""

    device_kind: str
    where: str  # "while compiling the train step", "at step 12"
    need: int | None  # XLA's analysis of the compiled step (None: it did not compile)
    limit: int | None  # the allocator's bytes_limit, where reported
    xla: str  # XLA's first line
    table: tuple[str, ...]  # the buffers-by-layer lines
    cfg: Any  # the run's resolved config and device count, for the estimator
    n_devices: int

    def render(self, predicted: int | None = None, suggestion: str | None = None) -> str:
        """The report's lines; `predicted` stands in for an unknown need."""
        if self.need is not None:
            needs = f"the step needs ~{_gib(self.need)} per device"
        elif predicted is not None:
            needs = f"the step needs ~{_gib(predicted)} per device (estimated: it did not compile)"
        else:
            needs = "the step's size is unknown (it did not compile)"
        has = (
            f"the device has {_gib(self.limit)}"
            if self.limit
            else "the device's size is not reported"
        )
        lines = [f"out of memory on {self.device_kind} {self.where}: {needs}, {has}"]
        lines += [f"XLA: {self.xla}", *self.table]
        lines.append(f"suggestion: {suggestion or GENERIC_SUGGESTION}")
        return "\n".join(lines)


def report(
    run: Any, batch_spec: Any, error: BaseException, where: str, compiled: Any = None
) -> Report:
    """The report of an allocation failure `where` ("while compiling the train step",
    "at step 12"). `compiled`: the compiled step, None if compiling failed (the program is then
    lowered again and read before optimization)."""
    device = next(d for d in run.mesh.devices.flat if d.process_index == jax.process_index())
    kind = getattr(device, "device_kind", "the device")
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 (a backend without stats)
        limit = None
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    try:
        if compiled is not None:
            text = compiled.as_text()
            source = "compiled step, per device"
        else:
            lowered = run.train_step.lower(run.abstract_state, batch_spec)
            text = lowered.as_text(dialect="hlo", debug_info=True)
            source = f"step before optimization and sharding, global over {run.mesh.size} devices"
        groups = buffers_by_layer(text)
    except Exception as e:  # noqa: BLE001 (the report must not fail in its turn)
        log.debug("no buffer table", exc_info=True)
        groups, source = [], f"unavailable: {type(e).__name__}"
    table = []
    if groups:
        total = sum(g.bytes for g in groups)
        table.append(
            f"largest buffers by layer ({source}): each instruction result >= "
            f"{_gib(MIN_BYTES)} counted once, not a live-range simulation"
        )
        for g in groups[:TOP]:
            table.append(
                f"  {_gib(g.bytes):>10}  {100 * g.bytes / total:3.0f}%  {g.path}  "
                f"[{g.count} buffer{'s' * (g.count != 1)}]"
            )
    else:
        table.append(f"no instruction result of {_gib(MIN_BYTES)} or more ({source})")
    need = step_bytes(compiled) if compiled is not None else None
    return Report(kind, where, need, limit, first[:200], tuple(table), run.cfg, run.mesh.size)


@contextlib.contextmanager
def reported(
    run: Any, batch_spec: Any, step: int | None = None, compiled: Any = None
) -> Iterator[None]:
    """Turn XLA's out-of-memory error inside the block (compiling the step, or running step
    `step` with the `compiled` step) into OutOfMemoryError carrying the report; other errors
    pass through untouched."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not is_oom(e):
            raise
        where = "while compiling the train step" if step is None else f"at step {step}"
        raise OutOfMemoryError(report(run, batch_spec, e, where, compiled)) from None
