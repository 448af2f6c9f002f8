"""The collectives in the compiled, sharded train step are the ones the sharding implies.

Each program is the real jitted train step (`build(cfg).train_step`: loss, grads, AdamW, the
finite checks) of a 3-layer transformer with scanned layers, compiled for 8 simulated CPU
devices; the tests read its optimized HLO (`lower(...).compile().as_text()`):

- nothing in it made XLA's SPMD partitioner fall back to an involuntary full
  rematerialization (logged from C++ to fd 2, captured here; a deliberately bad reshard proves
  the capture sees the message);
- fsdp=8: every fsdp-sharded parameter of a layer is all-gathered once in the forward layer
  loop and again in the backward loop as often as the backward reads it (by the remat policy),
  every gradient is reduced once, and outside the loops each parameter is gathered as often as
  its uses imply; the only duplicated gathers are a norm scale's (d_model elements each);
- data=4 x tensor=2: per block, the forward all-reduces one activation after each row-parallel
  matmul (attention output, MLP down: Megatron's two) and the backward one per column-parallel
  matmul input; no weight is ever gathered.

docs/collectives.md derives every expected number and shows how to read the HLO by hand."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from framework.config import load_config
from framework.parallel.sharding import batch_spec
from framework.train import Run, build
from framework.train.config import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"
# Distinct sizes (d_model 64, d_ff 128, vocab 96, positions 32) so a collective's shape says
# which parameter or activation it moves; every sharded dimension divides by 8. Three layers:
# the layer loops' trip count (3) is told apart from the mesh sizes.
N_LAYERS, BATCH, SEQ = 3, 16, 32
DIMS = (
    f"model.n_layers={N_LAYERS}",
    "model.d_model=64",
    "model.n_heads=8",
    "model.d_ff=128",
    "model.vocab_size=96",
    "model.max_seq_len=32",
    f"data.seq_len={SEQ}",
    f"data.batch_size={BATCH}",
)
# The tiny config is GPT-2 style like configs/default.yaml (learned positions, LayerNorm, GELU,
# biases, tied embeddings, remat none); Llama style as configs/llama_1b.yaml, scaled down.
LLAMA = (
    "model.position=rope",
    "model.norm=rmsnorm",
    "model.activation=swiglu",
    "model.bias=false",
    "model.tie_embeddings=false",
    "model.n_kv_heads=4",
    "model.remat=save_dots_no_batch",
)
FSDP8 = ("mesh.data=1", "mesh.fsdp=8")
DATA4_TENSOR2 = ("mesh.data=4", "mesh.tensor=2")
# LLVM's optimization level only: the optimized HLO these tests read is the same text as at
# the default level (checked on jax 0.10.2, 0.11.2 and 0.12.0.1), in about half the time.
FAST = {"xla_backend_optimization_level": 0}
REMAT_WARNING = re.compile(r"involuntary full rematerialization", re.IGNORECASE)

# ---------------------------------------------------------------------------------------------
# Reading compiled HLO text


KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%?\S+ = (?P<type>.+?) (?P<kind>" + "|".join(KINDS) + r")(?:-start)?\("
    r"(?P<operands>[^)]*)\)(?P<attrs>.*)$"
)
_HEADER = re.compile(r"^(?:ENTRY )?%?(?P<name>[^\s(]+) .*\{$")
_CALLEE = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_ITEMSIZE |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def group_size(attrs: str, n_devices: int) -> int:
    """Devices in each replica group, from any of the printed forms of `replica_groups`."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if mesh:  # mesh['data'=4,'tensor'=2] {'tensor'} (maybe with device_ids=(...) before the
        # braces): the product of the named axes' sizes
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:  # [4,2]<=[8]: 4 groups of 2
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if listed:  # {{0,1},{2,3},...}
        return len(listed.group(1).split(","))
    assert re.search(r"replica_groups=\{\}", attrs), attrs[:300]
    return n_devices  # {}: one group of every device


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # the result: (dtype, dims) per element
    operands: tuple[str, ...]
    attrs: str  # dimensions, replica groups, metadata
    group: int  # devices per replica group

    @property
    def op_name(self) -> str:
        found = re.search(r'op_name="([^"]*)"', self.attrs)
        return found.group(1) if found else ""

    def inputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, dims) of what each device contributes to a reduction: an all-reduce's
        operands are its results; a reduce-scatter's are `group` times its results along the
        scattered dimension (GPU pipelines fold CPU's all-reduce + dynamic-slice into one)."""
        if self.kind != "reduce-scatter":
            return list(self.arrays)
        dim = int(re.search(r"dimensions=\{(\d+)\}", self.attrs).group(1))
        return [(t, d[:dim] + (d[dim] * self.group,) + d[dim + 1 :]) for t, d in self.arrays]


def hlo_dtype(dtype) -> str:
    """numpy's name of a dtype -> HLO's (float32 -> f32, bfloat16 -> bf16)."""
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[str(jnp.dtype(dtype))]


def nbytes(arrays) -> int:
    return sum(math.prod(dims) * _ITEMSIZE[dtype] for dtype, dims in arrays)


def dims_key(dims) -> tuple[int, ...]:
    """A shape up to the order of its dimensions (XLA may gather or reduce a transposed copy;
    the tied unembedding gathers the [vocab, d_model] table as [d_model, vocab])."""
    return tuple(sorted(dims))


class Hlo:
    """Computations, call edges, layer loops and collectives of one compiled HLO module."""

    def __init__(self, text: str, n_devices: int):
        self.text = text
        self.lines: dict[str, list[str]] = {}
        self.entry = ""
        name = None
        for line in text.splitlines():
            header = None if line.startswith((" ", "}")) else _HEADER.match(line)
            if header:
                name = header.group("name")
                self.lines[name] = []
                self.entry = name if line.startswith("ENTRY") else self.entry
            elif line == "}":
                name = None
            elif name is not None:
                self.lines[name].append(line)
        assert self.entry, "no ENTRY computation in the HLO text"
        self.collectives: dict[str, list[Collective]] = {}
        for comp, lines in self.lines.items():
            found = []
            for line in lines:
                m = _COLLECTIVE.match(line)
                if m:
                    arrays = tuple(
                        (t, tuple(int(d) for d in dims.split(",") if d))
                        for t, dims in _ARRAY.findall(m.group("type"))
                    )
                    operands = tuple(re.findall(r"%([\w.\-]+)", m.group("operands")))
                    group = group_size(m.group("attrs"), n_devices)
                    found.append(Collective(m.group("kind"), arrays, operands, line, group))
            self.collectives[comp] = found

    def callees(self, comp: str) -> set[str]:
        out = set()
        for line in self.lines[comp]:
            out.update(_CALLEE.findall(line))
            for names in _CALLEE_LIST.findall(line):
                out.update(re.findall(r"%?([\w.\-]+)", names))
        return out & set(self.lines)

    def reachable(self, root: str) -> set[str]:
        seen, todo = set(), [root]
        while todo:
            comp = todo.pop()
            if comp not in seen:
                seen.add(comp)
                todo.extend(self.callees(comp))
        return seen

    def layer_loops(self) -> dict[str, tuple[str, int]]:
        """{"forward" | "backward": (body computation, trip count)} of the scans over the
        "blocks" scope; the backward loop's ops are named transpose(jvp(...))."""
        loops = {}
        for lines in self.lines.values():
            for line in lines:
                if " while(" not in line:
                    continue
                op_name = re.search(r'op_name="([^"]*)"', line)
                if op_name is None or not op_name.group(1).endswith("blocks/while"):
                    continue
                which = "backward" if "transpose(" in op_name.group(1) else "forward"
                assert which not in loops, f"two {which} layer loops"
                body = re.search(r"\bbody=%?([\w.\-]+)", line).group(1)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                loops[which] = (body, int(trips.group(1)) if trips else -1)
        return loops

    def runs_per_step(self) -> dict[str, int]:
        """How often each computation runs per step: a layer loop's trip count inside it."""
        runs = dict.fromkeys(self.lines, 1)
        for body, trips in self.layer_loops().values():
            runs.update(dict.fromkeys(self.reachable(body), trips))
        return runs

    def in_computations(self, comps: set[str]) -> list[Collective]:
        return [c for comp in sorted(comps) for c in self.collectives[comp]]

    def regions(self) -> dict[str, list[Collective]]:
        """Collectives of the forward loop body, the backward loop body (each runs once per
        layer) and of everything outside the two loops (runs once per step)."""
        loops = self.layer_loops()
        fwd = self.reachable(loops["forward"][0])
        bwd = self.reachable(loops["backward"][0])
        rest = self.reachable(self.entry) - fwd - bwd
        return {
            "forward": self.in_computations(fwd),
            "backward": self.in_computations(bwd),
            "outside": self.in_computations(rest),
        }


# ---------------------------------------------------------------------------------------------
# Compiling the train step, with XLA's C++ log captured


@contextlib.contextmanager
def fd2_into(out: list[str]):
    """Redirect file descriptor 2 (where XLA's C++ logging writes) into `out[-1]`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter: path, shape (per layer for block leaves), bytes, mesh axes per dim."""

    path: str
    dims: tuple[int, ...]
    itemsize: int
    axes: tuple[tuple[str, ...], ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * self.itemsize

    def split_over(self, axis: str) -> bool:
        return any(axis in a for a in self.axes)

    def local_dims(self, mesh_shape) -> tuple[int, ...]:
        return tuple(
            d // math.prod(mesh_shape[a] for a in ax)
            for d, ax in zip(self.dims, self.axes, strict=True)
        )


def _axes(spec: PartitionSpec, ndim: int) -> tuple[tuple[str, ...], ...]:
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    return tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries)


def param_leaves(run: Run) -> tuple[list[Leaf], list[Leaf]]:
    """(the per-layer leaves under "blocks", the other leaves), from the run's own shapes and
    shardings: the expected counts below are computed from the model, not typed in."""
    shapes = jax.tree_util.tree_flatten_with_path(run.abstract_state["params"])[0]
    specs = jax.tree.leaves(run.shardings["params"])
    blocks, rest = [], []
    for (path, shape), sharding in zip(shapes, specs, strict=True):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        axes = _axes(sharding.spec, len(shape.shape))
        size = np.dtype(shape.dtype).itemsize
        if name.startswith("blocks/"):  # [layers, ...]: the layer axis is never split
            assert axes[0] == (), name
            blocks.append(Leaf(name.removeprefix("blocks/"), shape.shape[1:], size, axes[1:]))
        else:
            rest.append(Leaf(name, shape.shape, size, axes))
    return blocks, rest


@dataclasses.dataclass(frozen=True)
class Program:
    run: Run
    hlo: Hlo
    log: str  # what XLA wrote to fd 2 while lowering and compiling

    @property
    def leaves(self):
        return param_leaves(self.run)


def compile_step(tmp_path, *overrides: str) -> Program:
    cfg = load_config(Config, TINY, [f"run.dir={tmp_path}", *DIMS, *overrides])
    run = build(cfg, read_data=False)
    placed = NamedSharding(run.mesh, batch_spec(2, run.rules, sequence=True))
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32, sharding=placed)
    log: list[str] = []
    with fd2_into(log):
        text = run.train_step.lower(run.abstract_state, {"inputs": tokens, "targets": tokens})
        text = text.compile(FAST).as_text()
    return Program(run, Hlo(text, run.mesh.size), log[0])


@pytest.fixture(scope="module")
def gpt2_fsdp(tmp_path_factory):
    return compile_step(tmp_path_factory.mktemp("gpt2_fsdp"), *FSDP8)


@pytest.fixture(scope="module")
def llama_fsdp(tmp_path_factory):
    return compile_step(tmp_path_factory.mktemp("llama_fsdp"), *LLAMA, *FSDP8)


@pytest.fixture(scope="module")
def gpt2_tensor(tmp_path_factory):
    return compile_step(tmp_path_factory.mktemp("gpt2_tensor"), *DATA4_TENSOR2)


# ---------------------------------------------------------------------------------------------
# 1. No involuntary full rematerialization


def _bad_reshard_log() -> str:
    """Compile a reshard the partitioner cannot do with all-to-alls: the last dim split over
    (b, a) to the first dim split over a alone. XLA replicates the array and logs the warning."""
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    src = NamedSharding(mesh, PartitionSpec(None, None, ("b", "a")))
    dst = NamedSharding(mesh, PartitionSpec("a", None, None))
    x = jax.ShapeDtypeStruct((8, 8, 8), jnp.float32, sharding=src)
    fn = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2, dst) + 1)
    log: list[str] = []
    with fd2_into(log):
        fn.lower(x).compile(FAST)
    return log[0]


def test_no_involuntary_full_rematerialization(gpt2_fsdp, llama_fsdp, gpt2_tensor):
    programs = {"gpt2 fsdp8": gpt2_fsdp, "llama fsdp8": llama_fsdp, "gpt2 tensor2": gpt2_tensor}
    for name, program in programs.items():
        assert not REMAT_WARNING.search(program.log), f"{name}:\n{program.log[-3000:]}"
    # The capture sees the message when there is one (run after the programs above, so a
    # message XLA printed only once per process could not hide theirs).
    assert REMAT_WARNING.search(_bad_reshard_log())


# ---------------------------------------------------------------------------------------------
# 2. FSDP: gathers of parameters, reductions of gradients
#
# How many times the backward layer-loop body all-gathers an fsdp-sharded block leaf. JAX keeps
# the sharded slice of each parameter (the scan's input) as the backward's residual, never the
# gathered copy, so every read in the backward body is a fresh gather (ZeRO-3: no layer's
# gathered weights outlive its loop iteration).
# - The transpose of `x @ W` reads W (dx = dy @ W.T); the transpose of a norm reads its scale
#   (dx_hat = dy * scale); the transpose of `+ b` reads nothing.
# - With remat, the body first recomputes what the policy did not save. Every policy here
#   (full, save_dots, save_dots_no_batch) drops the norms' outputs and the residual sum inside
#   the block, so the recompute reads the norms' scale and bias and the attention output bias
#   (the mid-block residual feeds the MLP norm); the MLP down bias is not read, since the block's
#   output is the next iteration's saved input. A kernel the recompute reads shares the
#   transpose's gather. A norm scale's two reads (recompute, transpose) get two identical
#   all-gathers that the CPU pipeline does not merge: a duplicate of d_model elements.


def backward_gathers(path: str, remat: str) -> int:
    recompute = int(remat != "none")
    parts = path.split("/")
    if parts[-1] == "kernel":
        return 1
    if parts[-2].endswith("norm") and parts[-1] == "scale":
        return 1 + recompute
    if parts[-2].endswith("norm") and parts[-1] == "bias":
        return recompute
    if path == "attn/o/bias":
        return recompute
    if path == "mlp/down/bias":
        return 0
    raise AssertionError(f"no derivation for the block leaf {path}: add one")


# Outside the loops the forward and backward share one computation, so a weight both read is
# gathered once (a dot's operand serves the forward and the backward dot), except:
# - a norm scale: the forward `x_hat * scale` and the backward `dy * scale` each gather it
#   (identical all-gathers the CPU pipeline does not merge, as in the loop);
# - the tied embedding table: the lookup gathers [vocab, d_model] (nn.embed constrains the
#   table to replicated), the unembedding gathers the transposed [d_model, vocab] again after
#   the layer loops instead of keeping the first copy alive through them.
# A norm bias, the position table and an untied embedding table are read by the forward only.
def outside_gathers(path: str, tied: bool) -> int:
    if path == "embed/embedding":
        return 1 + int(tied)
    if path.endswith("norm/scale"):
        return 2
    if path in ("final_norm/bias", "pos_embed/embedding", "unembed/kernel"):
        return 1
    raise AssertionError(f"no derivation for the parameter {path}: add one")


# Gradients: every gradient is a sum over the 8 batch shards, reduced once per leaf and step:
# the blocks' in the backward loop body (one reduction per leaf per layer), the others outside.
# XLA's CPU pipeline reduces the full gradient (all-reduce) and each device slices its shard;
# GPU pipelines rewrite that pair into a reduce-scatter (ReduceScatterCreator) of the same input
# bytes, which `Collective.inputs` counts alike. A tied table's gradient has two terms (lookup
# and unembedding), each reduced before they are added, so it is reduced twice.


def _gathers(collectives):
    return [c for c in collectives if c.kind == "all-gather"]


def _reduced(collectives, group: int):
    """Non-scalar arrays reduced over groups of `group` devices (scalars: the loss and metric
    sums, norms and finite flags of the step, not gradients)."""
    return [
        a
        for c in collectives
        if c.kind in ("all-reduce", "reduce-scatter") and c.group == group
        for a in c.inputs()
        if a[1]
    ]


def _gathered_dims(collectives) -> collections.Counter:
    return collections.Counter(dims_key(d) for c in _gathers(collectives) for _, d in c.arrays)


def _expected(leaves, times) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for leaf in leaves:
        out[dims_key(leaf.dims)] += times(leaf)
    return +out


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_fsdp_layer_loops_gather_each_weight_as_the_policy_implies(model, request):
    program = request.getfixturevalue(f"{model}_fsdp")
    mcfg = program.run.cfg.model
    blocks, _ = program.leaves
    loops = program.hlo.layer_loops()
    # The scanned layers are one loop body each way, run once per layer.
    assert {k: n for k, (_, n) in loops.items()} == {"forward": N_LAYERS, "backward": N_LAYERS}
    regions = program.hlo.regions()
    split = [leaf for leaf in blocks if leaf.split_over("fsdp")]
    assert split and all(leaf.split_over("fsdp") for leaf in blocks if "kernel" in leaf.path)
    # Forward body: every fsdp-sharded leaf of the layer exactly once (the rest, e.g. the q/k/v
    # and MLP-up biases whose only axis is "heads"/"mlp", is whole on every device already).
    fwd, bwd = regions["forward"], regions["backward"]
    assert _gathered_dims(fwd) == _expected(split, lambda leaf: 1)
    assert nbytes(a for c in _gathers(fwd) for a in c.arrays) == sum(x.nbytes for x in split)
    # Each gather is over the whole fsdp axis (8 devices) and yields the full per-layer leaf.
    assert {c.group for c in _gathers(fwd + bwd)} == {8}
    # Backward body: as often as the backward reads the leaf (see backward_gathers).
    times = lambda leaf: backward_gathers(leaf.path, mcfg.remat)  # noqa: E731
    assert _gathered_dims(bwd) == _expected(split, times), mcfg.remat
    expected_bytes = sum(x.nbytes * times(x) for x in split)
    assert nbytes(a for c in _gathers(bwd) for a in c.arrays) == expected_bytes
    # Gradients: one reduction of every block leaf's full per-layer gradient, in the backward
    # body only (none in the forward body).
    assert _reduced(fwd, 8) == []
    reduced = _reduced(bwd, 8)
    assert collections.Counter(dims_key(d) for _, d in reduced) == _expected(blocks, lambda x: 1)
    assert nbytes(reduced) == sum(leaf.nbytes for leaf in blocks)
    # FSDP needs nothing but gathers and reductions: no all-to-all, no collective-permute.
    kinds = {c.kind for cs in regions.values() for c in cs}
    assert kinds <= {"all-gather", "all-reduce", "reduce-scatter"}, kinds


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_fsdp_parameters_outside_the_loops_gathered_and_reduced_as_their_uses_imply(model, request):
    program = request.getfixturevalue(f"{model}_fsdp")
    tied = program.run.cfg.model.tie_embeddings
    _, others = program.leaves
    assert all(leaf.split_over("fsdp") for leaf in others)  # each has an "embed" dimension
    outside = program.hlo.regions()["outside"]
    times = lambda leaf: outside_gathers(leaf.path, tied)  # noqa: E731
    assert _gathered_dims(outside) == _expected(others, times)
    gathered = nbytes(a for c in _gathers(outside) for a in c.arrays)
    assert gathered == sum(leaf.nbytes * times(leaf) for leaf in others)
    reduced = _reduced(outside, 8)
    twice = lambda leaf: 1 + int(tied and leaf.path == "embed/embedding")  # noqa: E731
    assert collections.Counter(dims_key(d) for _, d in reduced) == _expected(others, twice)
    assert nbytes(reduced) == sum(leaf.nbytes * twice(leaf) for leaf in others)


def duplicate_gathers(hlo: Hlo) -> list[tuple[str, tuple]]:
    """(computation, arrays) of every all-gather that repeats an earlier one in the same
    computation: same operand, dimension and groups, so the same bytes moved again."""
    seen, out = set(), []
    for comp, collectives in hlo.collectives.items():
        for c in _gathers(collectives):
            dims = re.search(r"dimensions=\{[\d,]*\}", c.attrs).group(0)
            key = (comp, c.operands, dims, c.group)
            if key in seen:
                out.append((comp, c.arrays))
            seen.add(key)
    return out


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_fsdp_the_only_duplicated_gathers_are_norm_scales(model, request):
    """They occur, and only for norm scales (d_model elements; see the derivations above):
    the final norm's outside the loops and, where the remat policy recomputes the norms, each
    block norm's in the backward body. A duplicate of any other parameter fails here."""
    program = request.getfixturevalue(f"{model}_fsdp")
    mcfg = program.run.cfg.model
    blocks, _ = program.leaves
    block_norms = sum(leaf.path.endswith("norm/scale") for leaf in blocks)
    assert block_norms == 2  # the attention and the MLP pre-norm
    expected = 1 + (block_norms if mcfg.remat != "none" else 0)
    scale = ((hlo_dtype(mcfg.param_dtype), (mcfg.d_model,)),)
    duplicates = collections.Counter(arrays for _, arrays in duplicate_gathers(program.hlo))
    assert duplicates == collections.Counter({scale: expected})


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_fsdp_no_parameter_gathered_more_than_forward_and_backward(model, request):
    """The bound the counts above stay within, in bytes per step (a loop body's collectives
    weighted by its trip count): ZeRO-3 moves each fsdp-split parameter once for the forward
    and at most once more for the backward, so, the duplicates aside, the bytes gathered per
    step lie between 1x and 2x the bytes of the split parameters."""
    program = request.getfixturevalue(f"{model}_fsdp")
    hlo = program.hlo
    runs = hlo.runs_per_step()
    gathered = sum(
        runs[comp] * nbytes(c.arrays) for comp, cs in hlo.collectives.items() for c in _gathers(cs)
    )
    duplicated = sum(runs[comp] * nbytes(arrays) for comp, arrays in duplicate_gathers(hlo))
    blocks, others = program.leaves
    split = N_LAYERS * sum(x.nbytes for x in blocks if x.split_over("fsdp"))
    split += sum(x.nbytes for x in others if x.split_over("fsdp"))
    assert split < gathered - duplicated <= 2 * split


# ---------------------------------------------------------------------------------------------
# 3. Tensor parallel (data=4 x tensor=2), Megatron style
#
# A kernel split over "tensor" on its input dimension (attention output [heads, head_dim,
# embed], MLP down [mlp, embed]) is row-parallel: each device holds a partial sum of the output,
# all-reduced over the tensor pair in the forward (Megatron's "g"). A kernel split on an output
# dimension (q, k, v [embed, heads, head_dim], MLP up [embed, mlp]) is column-parallel: its
# input is whole on both devices and needs nothing in the forward, but the gradient of that
# input is a partial sum (Megatron's "f" in the backward). XLA's CPU pipeline all-reduces the
# input gradient of each column-parallel matmul before adding them up (4 per GPT-2 block: q, k,
# v, up); GPU pipelines fold a sum of all-reduces into one all-reduce of the sum
# (AllReduceReassociate), which gives Megatron's 2 (attention input, MLP input). Every
# activation all-reduced is one device's [batch / data, seq, d_model] in the compute dtype.


def test_tensor_parallel_all_reduces_per_block(gpt2_tensor):
    program = gpt2_tensor
    run = program.run
    blocks, _ = program.leaves
    tensor, data = run.mesh.shape["tensor"], run.mesh.shape["data"]
    assert (tensor, data) == (2, 4)
    kernels = [leaf for leaf in blocks if leaf.path.endswith("kernel")]
    row = [k for k in kernels if "tensor" in k.axes[0]]
    column = [k for k in kernels if k.split_over("tensor") and "tensor" not in k.axes[0]]
    assert sorted(k.path for k in row) == ["attn/o/kernel", "mlp/down/kernel"]
    assert sorted(k.path for k in column) == [f"attn/{n}/kernel" for n in "kqv"] + ["mlp/up/kernel"]
    activation = (
        hlo_dtype(run.cfg.model.compute_dtype),
        (BATCH // data, SEQ, run.cfg.model.d_model),
    )

    loops = program.hlo.layer_loops()
    assert {k: n for k, (_, n) in loops.items()} == {"forward": N_LAYERS, "backward": N_LAYERS}
    regions = program.hlo.regions()
    fwd, bwd = regions["forward"], regions["backward"]
    # Forward body: exactly the row-parallel all-reduces, as separate collectives (the
    # attention's must finish before the MLP's norm can run); nothing else, no gathers.
    assert [(c.kind, c.group, c.arrays) for c in fwd] == [
        ("all-reduce", tensor, (activation,))
    ] * len(row)
    # Backward body: one input-gradient all-reduce per column-parallel matmul (bytes, whatever
    # XLA's combiner makes of the op count), no gathers of the tensor-split weights.
    assert _gathers(bwd) == []
    assert collections.Counter(_reduced(bwd, tensor)) == collections.Counter(
        {activation: len(column)}
    )
    # ... and the block's gradients reduced over the data replicas, once each, a tensor-split
    # leaf as the device's own shard.
    reduced = _reduced(bwd, data)
    local = [leaf.local_dims(run.mesh.shape) for leaf in blocks]
    assert collections.Counter(dims_key(d) for _, d in reduced) == collections.Counter(
        dims_key(d) for d in local
    )
    assert nbytes(reduced) == sum(
        math.prod(d) * leaf.itemsize for d, leaf in zip(local, blocks, strict=True)
    )
    kinds = {c.kind for cs in regions.values() for c in cs}
    assert "all-to-all" not in kinds and "collective-permute" not in kinds, kinds
