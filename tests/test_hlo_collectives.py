"""The collectives are the ones we mean: the real jitted train step of a small transformer,
compiled for 8 simulated CPU devices, moves exactly the data its sharding implies.

Read from the compiled (partitioned) HLO, weighting each collective by how often it runs per
step (a scanned layer stack is one `while` body that XLA annotates with its trip count):

- no "involuntary full rematerialization" while compiling (XLA's SPMD partitioner logs it from
  C++ to fd 2; a deliberately conflicting constraint shows the capture sees it);
- FSDP (data=1, fsdp=8): every parameter sharded over fsdp is all-gathered once for the
  forward and, if the backward needs its value, once more for the backward (ZeRO-3), one
  layer at a time inside the loops; each gradient is reduced once across the 8 devices;
- tensor parallel (data=4, tensor=2): per block, one activation all-reduce after the attention
  output projection and one after the MLP down projection, their backward counterparts at the
  attention and MLP inputs, no tensor-parallel weight gathered.

docs/collectives.md derives every expected number below and reads the HLO by hand."""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jax_setup import no_compilation_cache

from framework.config import load_config
from framework.parallel.sharding import batch_spec
from framework.train import Run, build
from framework.train.config import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"
# tests/test_sharding.py's dimensions: divisible by 8 so every axis can take all 8 devices.
# The tiny config keeps n_layers=2, scan_layers=true, remat=none, tied embeddings, float32.
DIMS = ("model.n_heads=8", "model.d_model=64", "model.d_ff=128", "model.vocab_size=64")
FSDP = ("mesh.data=1", "mesh.fsdp=8")
TENSOR = ("mesh.data=4", "mesh.tensor=2")
# The remat policy configs/gpt2_small.yaml and configs/llama_1b.yaml train with.
FSDP_REMAT = (*FSDP, "model.remat=save_dots_no_batch")
REMAT_WARNING = "involuntary full rematerialization"  # spmd_partitioner.cc, any case

# ---------------------------------------------------------------------------------------------
# Reading the compiled HLO


class Collective(NamedTuple):
    kind: str  # all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) per result array
    group: int  # devices in each replica group
    runs: int  # executions per step: product of the trip counts of the loops around it
    op_name: str  # jax's metadata: "transpose(jvp(...))" marks the backward pass

    @property
    def nbytes(self) -> int:
        """Bytes of the results (an all-gather's full output, an all-reduce's whole input)."""
        return sum(DTYPE_BYTES[d] * math.prod(s) for d, s in self.arrays)

    @property
    def backward(self) -> bool:
        return "transpose(" in self.op_name


KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = ")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%(\S+?)[,)}\s]"
)


def _result_type(rest: str) -> tuple[str, str]:
    """Split 'TYPE opcode(...)...' where TYPE may be a nested tuple '(f32[2], (s32[]))'."""
    if not rest.startswith("("):
        head, _, tail = rest.partition(" ")
        return head, tail
    depth = 0
    for i, c in enumerate(rest):
        depth += (c == "(") - (c == ")")
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    raise ValueError(f"unbalanced result type: {rest[:200]}")


def _group_size(line: str) -> int:
    """Devices per replica group, in any of the three notations XLA prints."""
    if m := re.search(r"replica_groups=\{\{([0-9,]*)\}", line):  # explicit {{0,1},{2,3}}
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", line):  # iota [groups,size]<=[n]
        return int(m.group(1))
    # recent XLA: mesh['axis_0'=2,'axis_1'=4](, device_ids=...)? {'axis_1'}
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}", line):
        sizes = {k.strip("' "): int(v) for k, v in (p.split("=") for p in m.group(1).split(","))}
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
    raise ValueError(f"cannot read the replica groups of: {line[:300]}")


def collectives(hlo: str) -> list[Collective]:
    """Every collective of a compiled HLO module, with how often it runs per call."""
    computations: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo.splitlines():
        if m := _COMPUTATION.match(line):
            current = m.group(2)
            computations[current] = []
            entry = current if m.group(1) else entry
        elif current is not None and _INSTRUCTION.match(line):
            computations[current].append(line)
    callers = collections.defaultdict(list)  # callee -> [(caller, runs per caller run)]
    for name, lines in computations.items():
        for line in lines:
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for key, callee in _CALLEE.findall(line + " "):
                if key == "body":  # (a loop condition runs once more; it holds no collective)
                    assert trip, f"a while loop without a known trip count: {line[:300]}"
                callers[callee].append((name, int(trip.group(1)) if key == "body" else 1))
            for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for callee in re.findall(r"%([^\s,}]+)", branches):
                    callers[callee].append((name, 1))  # at most once: an upper bound

    @functools.cache
    def runs(name: str) -> int:
        return 1 if name == entry else sum(runs(c) * n for c, n in callers[name])

    found = []
    for name, lines in computations.items():
        for line in lines:
            result, rest = _result_type(line[_INSTRUCTION.match(line).end() :])
            opcode = rest.split("(", 1)[0]
            kind = opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            arrays = [
                (d, tuple(int(x) for x in s.split(",") if x)) for d, s in _ARRAY.findall(result)
            ]
            if opcode == "all-gather-start":  # ((operands), (results))
                arrays = arrays[len(arrays) // 2 :]
            op_name = re.search(r'op_name="([^"]*)"', line)
            group = 0 if kind == "collective-permute" else _group_size(line)
            assert runs(name) > 0, f"no caller found for {name}, which holds {line[:200]}"
            found.append(
                Collective(kind, tuple(arrays), group, runs(name), op_name[1] if op_name else "")
            )
    return found


# ---------------------------------------------------------------------------------------------
# Compiling the train step, with fd 2 captured


@contextlib.contextmanager
def captured_fd2() -> Iterator[list[str]]:
    """Whatever is written to file descriptor 2 (C++ logging included) inside the block; the
    text is in the yielded list's one element afterwards."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))
            # Pass it on, so a failing test still shows what XLA said.
            sys.stderr.write(out[0])


class Compiled(NamedTuple):
    run: Run
    hlo: str
    stderr: str
    ops: list[Collective]


def compile_step(tmp: Path, layout: tuple[str, ...]) -> Compiled:
    """Build the run from the tiny config on `layout`, lower the train step for abstract
    state and batch (with the shardings `put_batch` gives) and compile it."""
    cfg = load_config(Config, TINY, [f"run.dir={tmp}", *DIMS, *layout])
    run = build(cfg, read_data=False)
    m = run.cfg.model
    assert (m.param_dtype, m.compute_dtype) == ("float32", "float32")  # bytes below assume it
    sharding = NamedSharding(run.mesh, batch_spec(2, run.rules, sequence=True))
    shape = (run.cfg.data.batch_size, run.cfg.data.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in ("inputs", "targets")
    }
    with no_compilation_cache(), captured_fd2() as err:  # a cache hit would compile nothing
        hlo = run.train_step.lower(run.abstract_state, batch).compile().as_text()
    return Compiled(run, hlo, err[0], collectives(hlo))


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> Compiled:
    return compile_step(tmp_path_factory.mktemp("fsdp"), FSDP)


@pytest.fixture(scope="module")
def fsdp_remat(tmp_path_factory) -> Compiled:
    return compile_step(tmp_path_factory.mktemp("fsdp_remat"), FSDP_REMAT)


@pytest.fixture(scope="module")
def tensor(tmp_path_factory) -> Compiled:
    return compile_step(tmp_path_factory.mktemp("tensor"), TENSOR)


# ---------------------------------------------------------------------------------------------
# What the model implies


class Leaf(NamedTuple):
    path: str  # "blocks/attn/q/kernel"
    shape: tuple[int, ...]  # of one layer's slice for the stacked blocks
    runs: int  # instances per step: n_layers for the stacked blocks (one per layer), else 1
    spec: PartitionSpec
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def mesh_axes(self) -> set[str]:
        return {a for p in self.spec if p for a in ((p,) if isinstance(p, str) else p)}


def param_leaves(run: Run) -> list[Leaf]:
    params = run.abstract_state["params"]
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        stacked = name.startswith("blocks/")  # nn.stack: leading "layers" axis, never sharded
        shape = leaf.shape[1:] if stacked else leaf.shape
        spec = PartitionSpec(*leaf.sharding.spec[1:]) if stacked else leaf.sharding.spec
        runs = run.cfg.model.n_layers if stacked else 1
        out.append(Leaf(name, tuple(shape), runs, spec, np.dtype(leaf.dtype).itemsize))
    return out


def backward_needs_value(run: Run, leaf: Leaf) -> bool:
    """Whether the backward pass reads the parameter's value (so FSDP gathers it again): a
    matmul kernel (dx = dy @ W.T), a norm scale (dx involves dy * scale) and the tied embedding
    table (the unembedding is a matmul). Not a bias (the gradient of x + b does not involve b)
    nor a lookup table only looked up (its gradient scatter-adds dy into zeros)."""
    kind = leaf.path.rsplit("/", 1)[-1]
    if kind in ("kernel", "scale"):
        return True
    return leaf.path == "embed/embedding" and run.cfg.model.tie_embeddings


def shape_key(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shapes compared up to a transpose (XLA may gather a transposed copy of a table)."""
    return tuple(sorted(shape))


def gathered(ops: list[Collective], *, runs: int) -> collections.Counter:
    """All-gathered arrays by shape, counted per step, among ops that run `runs` times."""
    out: collections.Counter = collections.Counter()
    for op in ops:
        if op.kind == "all-gather" and op.runs == runs:
            for _, shape in op.arrays:
                out[shape_key(shape)] += op.runs
    return out


def reduced_bytes(ops: list[Collective], group: int, *, runs: int) -> int:
    """Bytes reduced per step over replica groups of `group` devices by ops that run `runs`
    times, scalars (loss and metric sums, finiteness flags) left out. A reduce-scatter counts
    its input (its result x group): on CPU XLA emits a gradient reduce-scatter as a full
    all-reduce plus a dynamic-slice, on GPU as a reduce-scatter; both reduce the same data."""
    total = 0
    for op in ops:
        if op.kind in ("all-reduce", "reduce-scatter") and op.group == group and op.runs == runs:
            scale = group if op.kind == "reduce-scatter" else 1
            arrays = [a for a in op.arrays if a[1]]  # rank >= 1
            total += scale * op.runs * sum(DTYPE_BYTES[d] * math.prod(s) for d, s in arrays)
    return total


# ---------------------------------------------------------------------------------------------
# 1. No involuntary full rematerialization


def test_capture_sees_the_partitioners_cxx_warning():
    """The canary: an array split over mesh axis x, constrained to be split over y on the other
    dimension, is a resharding the partitioner can only do by replicating the whole array, and
    it says so on fd 2 from C++. Seeing it here proves the capture below would see it too (and
    that no TF_CPP_MIN_LOG_LEVEL hides warnings)."""
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    split = lambda *spec: NamedSharding(mesh, PartitionSpec(*spec))  # noqa: E731

    def conflicting(v):
        return jax.lax.with_sharding_constraint(v * 2, split(None, "y")) + 1

    arg = jax.ShapeDtypeStruct((16, 16), jnp.float32, sharding=split("x", None))
    with no_compilation_cache(), captured_fd2() as err:
        jax.jit(conflicting).lower(arg).compile()
    assert REMAT_WARNING in err[0].lower(), err[0]


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_remat", "tensor"])
def test_no_involuntary_full_rematerialization(layout, request):
    compiled: Compiled = request.getfixturevalue(layout)
    assert REMAT_WARNING not in compiled.stderr.lower(), compiled.stderr


# ---------------------------------------------------------------------------------------------
# 2. FSDP: parameter all-gathers and gradient reductions


def test_fsdp_gathers_each_parameter_once_forward_and_once_more_if_backward_reads_it(fsdp):
    """ZeRO-3 without remat: a parameter sharded over fsdp is gathered for its forward use and,
    when the backward reads its value, gathered again there: the scan keeps the sharded layer
    slice as its residual, not the gathered copy (which would hold every layer's full
    weights until the backward). The stacked blocks are gathered one layer at a time, inside
    the forward and backward loops (runs = n_layers); nothing else moves."""
    run, n_layers = fsdp.run, fsdp.run.cfg.model.n_layers
    assert {op.kind for op in fsdp.ops} <= {"all-gather", "all-reduce", "reduce-scatter"}
    assert {op.group for op in fsdp.ops} == {run.mesh.shape["fsdp"]}
    leaves = param_leaves(run)
    sharded = [leaf for leaf in leaves if "fsdp" in leaf.mesh_axes]
    expected = {n_layers: collections.Counter(), 1: collections.Counter()}
    for leaf in sharded:
        expected[leaf.runs][shape_key(leaf.shape)] += leaf.runs * (
            1 + backward_needs_value(run, leaf)
        )
    for runs in (n_layers, 1):
        found = gathered(fsdp.ops, runs=runs)
        over = {s: (n, expected[runs][s]) for s, n in found.items() if n > expected[runs][s]}
        assert not over, f"gathered more often than forward + backward: {over}"
        assert found == expected[runs], (runs, found, expected[runs])
    assert all(op.runs in (1, n_layers) for op in fsdp.ops if op.kind == "all-gather")

    # Per layer: 12 of the block's 16 leaves have an "embed" dimension and are gathered for
    # the forward; the 8 kernels and norm scales among them again for the backward.
    per_layer = [leaf for leaf in sharded if leaf.runs == n_layers]
    reread = [leaf for leaf in per_layer if backward_needs_value(run, leaf)]
    block_gathers = [op for op in fsdp.ops if op.kind == "all-gather" and op.runs == n_layers]
    assert sum(not op.backward for op in block_gathers) == len(per_layer)
    assert sum(op.backward for op in block_gathers) == len(reread)

    # The same as bytes, the invariant that survives XLA combining gathers into tuples.
    gathered_bytes = sum(op.nbytes * op.runs for op in fsdp.ops if op.kind == "all-gather")
    param_bytes = sum(
        leaf.nbytes * leaf.runs * (1 + backward_needs_value(run, leaf)) for leaf in sharded
    )
    assert gathered_bytes == param_bytes


def _fsdp_gradient_bytes(fsdp: Compiled) -> dict[str, int]:
    run, n_layers = fsdp.run, fsdp.run.cfg.model.n_layers
    group = run.mesh.shape["fsdp"]
    leaves = param_leaves(run)
    return {
        "blocks_found": reduced_bytes(fsdp.ops, group, runs=n_layers),
        "blocks": sum(leaf.nbytes * leaf.runs for leaf in leaves if leaf.runs == n_layers),
        "top_found": reduced_bytes(fsdp.ops, group, runs=1),
        "top": sum(leaf.nbytes for leaf in leaves if leaf.runs == 1),
        "embedding": next(leaf.nbytes for leaf in leaves if leaf.path == "embed/embedding"),
    }


def test_fsdp_reduces_each_gradient_once_per_layer_in_the_backward_loop(fsdp):
    """The batch is split over fsdp, so every gradient (sharded leaf or not) is a sum of 8
    partial sums: reduced once, a layer at a time inside the backward loop. XLA combines a
    layer's 16 reductions into one tuple all-reduce, so the count of ops says little: the
    bytes must be the parameters' bytes. Outside the loop the tied embedding is reduced twice:
    the lookup (a scatter-add) and the unembedding (a matmul) each give a partial gradient,
    and XLA reduces each before adding them (test_fsdp_tied_embedding_gradient_reduced_once)."""
    b = _fsdp_gradient_bytes(fsdp)
    assert b["blocks_found"] == b["blocks"]
    assert b["top_found"] == b["top"] + b["embedding"]
    n_layers = fsdp.run.cfg.model.n_layers
    assert all(op.backward for op in fsdp.ops if op.kind != "all-gather" and op.runs == n_layers)


@pytest.mark.xfail(
    strict=True,
    reason="XLA reduces the tied embedding's two partial gradients (lookup and unembedding) "
    "separately: one extra vocab x d_model reduction per step (docs/collectives.md)",
)
def test_fsdp_tied_embedding_gradient_reduced_once(fsdp):
    b = _fsdp_gradient_bytes(fsdp)
    assert b["top_found"] == b["top"]


def _remat_gathers(compiled: Compiled) -> tuple[collections.Counter, collections.Counter]:
    """(found, at most) per-layer gathers by shape: with remat the backward recomputes part of
    the forward, which reads parameters too. Which ones depends on the policy, but never more
    than the forward read, and the recompute and the gradient can share the gathered copy: at
    most twice per step, like without remat."""
    run, n_layers = compiled.run, compiled.run.cfg.model.n_layers
    at_most: collections.Counter = collections.Counter()
    for leaf in param_leaves(run):
        if "fsdp" in leaf.mesh_axes and leaf.runs == n_layers:
            at_most[shape_key(leaf.shape)] += 2 * leaf.runs
    return gathered(compiled.ops, runs=n_layers), at_most


def test_fsdp_with_remat_gathers_each_kernel_once_per_pass(fsdp_remat):
    """save_dots_no_batch keeps the projections' outputs and recomputes the norms and
    residual adds in the backward. Every matmul kernel (nearly all the bytes) is still gathered
    exactly twice per layer: forward, and once in the backward shared by the recompute and
    the gradient. The vectors (norm scales and biases, one shape) are checked against the
    bound in test_fsdp_with_remat_gathers_nothing_more_than_twice."""
    run = fsdp_remat.run
    found, at_most = _remat_gathers(fsdp_remat)
    kernels = {
        shape_key(leaf.shape)
        for leaf in param_leaves(run)
        if leaf.path.endswith("/kernel") and leaf.runs == run.cfg.model.n_layers
    }
    assert {s: found[s] for s in kernels} == {s: at_most[s] for s in kernels}
    vector = shape_key((run.cfg.model.d_model,))
    assert set(found) == set(at_most) and found[vector] >= at_most[vector] // 2


@pytest.mark.xfail(
    strict=True,
    reason="under remat the backward gathers each norm scale twice (for the recomputed norm "
    "and for the norm's gradient): 3 gathers per layer per step (docs/collectives.md)",
)
def test_fsdp_with_remat_gathers_nothing_more_than_twice(fsdp_remat):
    found, at_most = _remat_gathers(fsdp_remat)
    assert {s: n for s, n in found.items() if n > at_most[s]} == {}


# ---------------------------------------------------------------------------------------------
# 3. Tensor parallel: Megatron's all-reduces per block


def _activation_bytes(run: Run) -> int:
    """One device's [batch / data, seq, d_model] float32 activation."""
    rows = run.cfg.data.batch_size // run.mesh.shape["data"]
    return rows * run.cfg.data.seq_len * run.cfg.model.d_model * 4


def _block_tensor_reductions(tensor: Compiled) -> tuple[list[Collective], list[Collective]]:
    run = tensor.run
    ops = [
        op
        for op in tensor.ops
        if op.kind == "all-reduce"
        and op.group == run.mesh.shape["tensor"]
        and op.runs == run.cfg.model.n_layers
    ]
    return [op for op in ops if not op.backward], [op for op in ops if op.backward]


def test_tensor_parallel_all_reduces_per_block(tensor):
    """Megatron: attention heads and the MLP hidden units are split over tensor, so the
    attention output projection and the MLP down projection each end in a partial sum over
    the 2 devices: one all-reduce of the block's [batch/data, seq, d_model] activation each
    in the forward. Their backward counterparts reduce the gradient of the block's inputs to
    those layers: the MLP's (one input projection, "up") and the attention's, where q, k and v
    are three separate projections, each reduced: 3 activations (a fused QKV, as in Megatron,
    would be 1; test_tensor_parallel_attention_input_gradient_reduced_once)."""
    run = tensor.run
    act = _activation_bytes(run)
    shape = (run.cfg.data.batch_size // run.mesh.shape["data"], run.cfg.data.seq_len)
    shape += (run.cfg.model.d_model,)
    forward, backward = _block_tensor_reductions(tensor)
    assert [op.arrays for op in forward] == [(("f32", shape),)] * 2
    assert sum("/attn/" in op.op_name for op in forward) == 1  # after the output projection
    assert sum("/mlp/down/" in op.op_name for op in forward) == 1
    assert {a for op in backward for a in op.arrays} == {("f32", shape)}
    mlp_inputs = 2 if run.cfg.model.activation == "swiglu" else 1  # up (and gate)
    attention_inputs = 3  # q, k, v
    attention = sum(op.nbytes for op in backward if "/attn/" in op.op_name)
    mlp = sum(op.nbytes for op in backward if "/mlp/" in op.op_name)
    assert (attention, mlp) == (attention_inputs * act, mlp_inputs * act)
    assert sum(op.nbytes for op in backward) == attention + mlp


@pytest.mark.xfail(
    strict=True,
    reason="q, k and v are separate projections and XLA all-reduces each input gradient "
    "before summing them: 3 activations per block instead of 1 (docs/collectives.md)",
)
def test_tensor_parallel_attention_input_gradient_reduced_once(tensor):
    _, backward = _block_tensor_reductions(tensor)
    attention = sum(op.nbytes for op in backward if "/attn/" in op.op_name)
    assert attention == _activation_bytes(tensor.run)


def test_tensor_parallel_gathers_no_weight_and_reduces_gradient_shards_over_data(tensor):
    """Tensor-parallel weights stay split: the one all-gather is the embedding table, which
    `nn.embed` gathers on purpose for the lookup (split over vocab it cannot be looked up into
    batch-split activations without a full rematerialization). Over data each gradient shard
    is reduced once, a layer at a time in the backward loop: per layer, the bytes one device
    holds of a layer's parameters."""
    run, n_layers = tensor.run, tensor.run.cfg.model.n_layers
    assert {op.kind for op in tensor.ops} == {"all-gather", "all-reduce"}
    gathers = [op for op in tensor.ops if op.kind == "all-gather"]
    table = run.abstract_state["params"]["embed"]["embedding"]
    assert [(op.arrays, op.runs, op.backward) for op in gathers] == [
        ((("f32", table.shape),), 1, False)
    ]
    leaves = param_leaves(run)
    shard_bytes = sum(
        leaf.nbytes // math.prod(run.mesh.shape[a] for a in leaf.mesh_axes) * leaf.runs
        for leaf in leaves
        if leaf.runs == n_layers
    )
    assert reduced_bytes(tensor.ops, run.mesh.shape["data"], runs=n_layers) == shard_bytes
