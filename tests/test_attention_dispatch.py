"""impl=auto for attention: the per-generation table, measured overrides, and the choice made
while lowering for an abstract H100 from this CPU host; impl=pallas/mosaic on Hopper."""

import importlib
import importlib.util
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import H100, abstract_gpu_mesh

from framework import ops
from framework.ops import attention_dispatch as dispatch
from framework.ops import registry
from pallas_kernels import flash_attention_mgpu as mgpu

attention = importlib.import_module("framework.ops.attention")  # the module (ops.attention: the op)

A100 = "NVIDIA A100-SXM4-80GB"
B200 = "NVIDIA B200"


def _call(**kw) -> dispatch.Call:
    base = dict(
        device_kind=H100,
        dtype="bfloat16",
        head_dim=128,
        q_len=8192,
        kv_len=8192,
        causal=True,
        segments=False,
        mask=False,
        triton_ok=True,
        cudnn_available=True,
        mosaic_ok=True,  # as on a Hopper with a jax that has the Mosaic GPU API
    )
    return dispatch.Call(**{**base, **kw})


NO_MOSAIC = {"mosaic_ok": False}


@pytest.mark.parametrize(
    "kw,impl",
    [
        ({}, "cudnn"),  # Hopper, bf16, causal, hd128: cuDNN's fused attention
        ({"device_kind": B200}, "cudnn"),
        ({"dtype": "float16", "causal": False}, "cudnn"),
        ({"head_dim": 256}, "cudnn"),  # Hopper takes up to 256
        ({"segments": True}, "mosaic"),  # cuDNN has no segment ids; Hopper: the Mosaic kernel
        ({"segments": True, **NO_MOSAIC}, "triton"),  # e.g. a jax without Mosaic GPU
        ({"segments": True, "device_kind": B200}, "triton"),  # Blackwell: never Mosaic (sm90)
        ({"segments": True, "device_kind": A100}, "triton"),
        ({"dtype": "float32", **NO_MOSAIC}, "triton"),  # cuDNN and Mosaic take 16-bit only
        ({"head_dim": 80 + 4, **NO_MOSAIC}, "triton"),  # not a multiple of 8
        ({"q_len": 1, "kv_len": 8192}, "mosaic"),  # cuDNN aligns a causal mask differently
        ({"cudnn_available": False}, "mosaic"),  # lowering for an abstract GPU: no cuDNN checks
        ({"cudnn_available": False, **NO_MOSAIC}, "triton"),
        ({"cudnn_available": False, "device_kind": B200}, "triton"),
        ({"device_kind": A100}, "triton"),  # before Hopper: the Triton kernel
        ({"device_kind": A100, "head_dim": 256, "triton_ok": False}, "xla"),
        ({"mask": True, "triton_ok": False, **NO_MOSAIC}, "xla"),  # only XLA takes a mask
        ({"device_kind": "cpu", "on_gpu": False}, "xla"),
        ({"dtype": "mixed", **NO_MOSAIC}, "triton"),  # cuDNN needs one dtype for q, k and v
    ],
)
def test_table(kw, impl):
    assert dispatch.choose(_call(**kw))[0] == impl


def test_mosaic_is_preferred_only_on_hopper():
    assert dispatch.PREFERENCE["hopper"] == ("cudnn", "mosaic", "triton")
    assert all("mosaic" not in p for g, p in dispatch.PREFERENCE.items() if g != "hopper")


def test_measured_entry_overrides_the_table_near_its_length():
    entry = dict(
        device=H100.lower(),
        dtype="bfloat16",
        head_dim=128,
        causal=True,
        seq_len=2048,
        best="triton",
        measured="2026-11-27 jax 0.11.2",
    )
    assert dispatch.choose(_call(q_len=2048, kv_len=2048), [entry]) == (
        "triton",
        "measured 2026-11-27 jax 0.11.2 at seq 2048",
    )
    assert dispatch.choose(_call(q_len=4096, kv_len=4096), [entry])[0] == "triton"
    # Out of reach (x8 longer), another head dim, non-causal, another card: the table decides.
    for kw in ({"q_len": 16384, "kv_len": 16384}, {"head_dim": 64}, {"causal": False}):
        assert dispatch.choose(_call(**kw), [entry])[0] == "cudnn", kw
    assert dispatch.choose(_call(device_kind=B200, q_len=2048, kv_len=2048), [entry])[0] == "cudnn"
    # A measured winner that cannot take this call (segments: no cuDNN) is not used: the
    # fastest measured kernel that takes it is (an old "pallas" row is Triton), else the table.
    cudnn_entry = {**entry, "best": "cudnn"}
    seg = _call(q_len=2048, kv_len=2048, segments=True)
    assert dispatch.choose(seg, [cudnn_entry])[0] == "mosaic"
    timed = {**cudnn_entry, "ms": {"cudnn": 8.0, "mosaic": 12.0, "pallas": 9.5, "xla": 1.0}}
    assert dispatch.choose(seg, [timed]) == (
        "triton",
        "measured 2026-11-27 jax 0.11.2 at seq 2048 (fastest that takes the call)",
    )
    assert dispatch.choose(_call(q_len=2048, kv_len=2048, segments=True, triton_ok=False),
                           [timed])[0] == "mosaic"  # fmt: skip
    assert dispatch.choose(_call(q_len=2048, kv_len=2048), [{**entry, "best": "mosaic"}])[0] == (
        "mosaic"
    )
    # Mosaic measured but unavailable for this call (old jax): the table's next choice.
    no_mosaic = _call(q_len=2048, kv_len=2048, **NO_MOSAIC)
    assert dispatch.choose(no_mosaic, [{**entry, "best": "mosaic"}])[0] == "cudnn"
    # A Blackwell entry naming mosaic (never valid there) leaves the call to the table.
    b200 = {**entry, "device": B200.lower(), "best": "mosaic"}
    assert dispatch.choose(_call(device_kind=B200, q_len=2048, kv_len=2048), [b200])[0] == "cudnn"


def test_an_old_pallas_entry_means_triton():
    """Files written before the Mosaic kernels were measured name the Triton kernel "pallas"."""
    entry = dict(device=H100.lower(), dtype="bfloat16", head_dim=128, causal=True, seq_len=2048)
    old = {**entry, "best": "pallas", "measured": "2026-11-20 jax 0.10.2"}
    assert dispatch.choose(_call(q_len=2048, kv_len=2048), [old]) == (
        "triton",
        "measured 2026-11-20 jax 0.10.2 at seq 2048",
    )
    assert dispatch.choose(_call(q_len=2048, kv_len=2048, triton_ok=False), [old])[0] == "cudnn"


def test_measured_file_is_read_and_a_damaged_one_named(tmp_path, monkeypatch):
    entry = dict(device="x", dtype="bfloat16", head_dim=128, causal=True, seq_len=2048)
    good = tmp_path / "m.json"
    for best in ("cudnn", "mosaic", "triton", "xla", "pallas"):
        good.write_text(json.dumps({"entries": [{**entry, "best": best}]}))
        assert dispatch.measured_entries(str(good)) == ({**entry, "best": best},)
    assert dispatch.measured_entries(str(tmp_path / "absent.json")) == ()
    # The environment variable is read on every call (not frozen by a cache).
    monkeypatch.setenv("FRAMEWORK_ATTENTION_MEASURED", str(good))
    assert dispatch.measured_entries()[0]["best"] == "pallas"
    bad = tmp_path / "bad.json"
    for text in ("{not json", json.dumps({"entries": [{**entry, "best": "flash"}]})):
        bad.write_text(text)
        with pytest.raises(ValueError, match="bad.json: not a measured-dispatch file"):
            dispatch.measured_entries(str(bad))
    bad.write_text(json.dumps({"entries": [{**entry, "seq_len": "2k", "best": "xla"}]}))
    with pytest.raises(ValueError, match="entry 0: seq_len must be a int"):
        dispatch.measured_entries(str(bad))


def test_auto_under_an_abstract_h100_picks_a_kernel_and_logs_why(monkeypatch, caplog):
    """Lowered for an abstract H100 from a CPU host, auto takes the Mosaic kernel where this jax
    has it, else the Triton kernel (cuDNN's checks need the real device), and logs the reason
    once; on the CPU itself it stays on XLA."""
    monkeypatch.setattr(registry, "_LOGGED", set())
    monkeypatch.setattr(attention, "_mosaic_warned", True)  # the absence: its own test below
    kernel = "mosaic" if mgpu.available() is None else "triton"
    q = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
    f = jax.jit(lambda q: ops.attention(q, q, q, causal=True, impl="auto"))
    with caplog.at_level(logging.INFO, logger="framework.ops"):
        with jax.sharding.use_abstract_mesh(abstract_gpu_mesh({"x": 1})):
            f.trace(q)
        f.trace(q)
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ops.attention")]
    assert len(chosen) == 2, chosen
    assert f"chose {kernel}" in chosen[0] and "hopper table" in chosen[0], chosen
    assert "chose xla" in chosen[1] and "cpu: not compiling for a GPU" in chosen[1], chosen


@pytest.fixture
def spies(monkeypatch, ops_log):
    """Which kernel attention_pallas / auto ran: _mosaic and _triton replaced by recorders
    (returning q, so nothing is lowered); the once-per-process warning flag reset."""
    ran = []
    monkeypatch.setattr(attention, "_mosaic", lambda q, k, v, **kw: ran.append("mosaic") or q)
    monkeypatch.setattr(attention, "_triton", lambda q, k, v, **kw: ran.append("triton") or q)
    monkeypatch.setattr(attention, "_mosaic_warned", False)
    monkeypatch.setattr(registry, "_LOGGED", set())
    return ran, ops_log


def _trace(device_kind, impl, seq=128, **kw):
    q = jax.ShapeDtypeStruct((1, seq, 4, 64), jnp.bfloat16)
    f = jax.jit(lambda q: ops.attention(q, q, q, causal=True, impl=impl, **kw))
    with jax.sharding.use_abstract_mesh(abstract_gpu_mesh({"x": 1}, device_kind)):
        f.trace(q)


def test_pallas_is_mosaic_on_hopper_where_available(spies, monkeypatch):
    ran, messages = spies
    monkeypatch.setattr(mgpu, "available", lambda: None)
    monkeypatch.setattr(mgpu, "unsupported", lambda *a, window=None, **kw: window and "window")
    _trace(H100, "pallas")
    _trace(H100, "pallas", window=16)  # the Mosaic kernels take no window: Triton
    _trace(B200, "pallas")  # wgmma kernels: Hopper only
    _trace(A100, "pallas")
    seg = jnp.zeros((1, 128), jnp.int32)
    _trace(H100, "auto", segment_ids=seg)  # no cuDNN for segment ids: Mosaic
    _trace(B200, "auto", segment_ids=seg)
    assert ran == ["mosaic", "triton", "triton", "triton", "mosaic", "triton"]
    assert not [m for m in messages if "unavailable" in m], messages


def test_mosaic_unavailable_on_hopper_is_said_once_and_triton_runs(spies, monkeypatch):
    """A jax without the Mosaic GPU API (simulated): pallas and auto take the Triton kernel on
    Hopper, and one warning per process names the reason, however many calls and shapes."""
    ran, messages = spies
    reason = "jax 0.10.2 lacks jax.experimental.pallas.mosaic_gpu (InterpretGPUParams)"
    monkeypatch.setattr(mgpu, "available", lambda: reason)
    seg = jnp.zeros((1, 128), jnp.int32)
    for seq in (128, 128, 256):
        _trace(H100, "pallas", seq=seq)
        _trace(H100, "auto", seq=seq, segment_ids=seg[:, :seq] if seq == 128 else None)
    _trace(B200, "pallas")  # not Hopper: nothing to say
    assert ran == ["triton"] * 7, ran
    warned = [m for m in messages if "Mosaic GPU kernels unavailable" in m]
    assert len(warned) == 1 and reason in warned[0] and H100 in warned[0], messages
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"^attention impl=mosaic: jax 0\.10\.2 lacks"):
        ops.attention(q, q, q, impl="mosaic")


def test_mosaic_refuses_other_gpus_and_unsupported_calls_in_one_line(monkeypatch):
    monkeypatch.setattr(mgpu, "available", lambda: None)
    monkeypatch.setattr(
        mgpu, "unsupported", lambda *a, mask=None, **kw: None if mask is None else "m"
    )
    with pytest.raises(ValueError, match=r"impl=mosaic: the kernels are for Hopper \(sm90\)"):
        _trace(B200, "mosaic")
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="^attention impl=mosaic: m; use impl=triton"):
        ops.attention(q, q, q, mask=jnp.ones((1, 1, 64, 64), bool), impl="mosaic")


@pytest.mark.skipif(mgpu.available() is not None, reason=str(mgpu.available()))
@pytest.mark.parametrize("segments", [False, True])
def test_mosaic_interpreted_on_cpu_matches_xla(segments):
    """impl=mosaic on a CPU host runs the Mosaic GPU kernels in interpret mode."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, 64, 2, 64), jnp.float16)
    k, v = (jax.random.normal(key, (1, 64, 1, 64), jnp.float16) for key in keys[1:])
    kw = dict(causal=True)
    if segments:
        kw["segment_ids"] = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 32)[None]
    got = ops.attention(q, k, v, impl="mosaic", **kw).astype(jnp.float32)
    want = ops.attention(q, k, v, impl="xla", **kw).astype(jnp.float32)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


def _bench_kernels():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_times_mosaic_on_hopper_and_measures_the_fastest_kernel(monkeypatch):
    bench = _bench_kernels()
    monkeypatch.setattr(mgpu, "available", lambda: None)
    assert bench.attention_impls(True, H100) == (["triton", "mosaic", "cudnn", "xla", "auto"], None)
    impls, why = bench.attention_impls(True, B200)
    assert "mosaic" not in impls and "for Hopper (sm90), not NVIDIA B200" in why
    assert bench.attention_impls(False, "cpu")[0] == ["pallas", "xla"]
    monkeypatch.setattr(mgpu, "available", lambda: "jax 0.10.2 lacks it")
    assert bench.attention_impls(True, H100) == (
        ["triton", "cudnn", "xla", "auto"],
        "jax 0.10.2 lacks it",
    )
    row = dict(op="attention", shape=[2, 8192, 16, 16, 128], causal=True, dtype="bfloat16")
    times = {"triton": 3.0, "mosaic": 1.5, "cudnn": 2.0, "xla": 20.0, "auto": 1.0}
    rows = [{**row, "impl": i, "fwd_ms": t, "bwd_ms": 2 * t} for i, t in times.items()]
    (entry,) = bench.dispatch_entries(rows, H100)
    assert entry["best"] == "mosaic" and entry["ms"]["triton"] == 9.0  # auto is never a winner
    rows = [
        {**row, "impl": i, "fwd_ms": t, "bwd_ms": 2 * t} for i, t in (("triton", 1), ("mosaic", 2))
    ]
    assert bench.dispatch_entries(rows, H100)[0]["best"] == "triton"
    # A "pallas" row (CPU runs, older results) is the Triton kernel.
    rows = [
        {**row, "impl": i, "fwd_ms": t, "bwd_ms": 2 * t} for i, t in (("pallas", 1), ("cudnn", 2))
    ]
    assert bench.dispatch_entries(rows, H100)[0]["best"] == "triton"


# ---------------------------------------------------------------------------------------------
# Compiled on a GPU (scripts/gpu_check.sh runs these; deselected on CPU by `-m 'not gpu'`).


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cudnn", "auto", "pallas"])
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_and_auto_match_the_reference_on_gpu(impl, causal):
    """The path auto takes on Hopper (cuDNN), auto itself and pallas (the Mosaic kernels on
    Hopper with a jax that has them): values and gradients, GQA 4."""
    from test_flash_attention import _inputs, assert_as_accurate_as_xla

    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    q, k, v, do = _inputs(1, 2, 1024, 1024, 8, 2, 128, jnp.bfloat16)
    fn = lambda q, k, v, **a: ops.attention(q, k, v, impl=impl, **a)
    assert_as_accurate_as_xla(fn, q, k, v, do, dict(causal=causal))
