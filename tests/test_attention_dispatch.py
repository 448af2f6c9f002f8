"""impl=auto for attention: the per-generation table, measured overrides, and the choice made
while lowering for an abstract H100 from this CPU host."""

import json
import logging

import jax
import jax.numpy as jnp
import pytest
from cuda_lowering import H100, abstract_gpu_mesh

from framework import ops
from framework.ops import attention_dispatch as dispatch
from framework.ops import registry

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
        pallas_ok=True,
        cudnn_available=True,
    )
    return dispatch.Call(**{**base, **kw})


@pytest.mark.parametrize(
    "kw,impl",
    [
        ({}, "cudnn"),  # Hopper, bf16, causal, hd128: cuDNN's fused attention
        ({"device_kind": B200}, "cudnn"),
        ({"dtype": "float16", "causal": False}, "cudnn"),
        ({"head_dim": 256}, "cudnn"),  # Hopper takes up to 256
        ({"segments": True}, "pallas"),  # cuDNN has no segment ids
        ({"dtype": "float32"}, "pallas"),  # cuDNN takes 16-bit types only
        ({"head_dim": 80 + 4}, "pallas"),  # not a multiple of 8
        ({"q_len": 1, "kv_len": 8192}, "pallas"),  # cuDNN aligns a causal mask differently
        ({"cudnn_available": False}, "pallas"),  # lowering for an abstract GPU: no cuDNN checks
        ({"device_kind": A100}, "pallas"),  # before Hopper: the Triton kernel
        ({"device_kind": A100, "head_dim": 256, "pallas_ok": False}, "xla"),
        ({"mask": True, "pallas_ok": False}, "xla"),  # an arbitrary mask: only XLA takes it
        ({"device_kind": "cpu", "on_gpu": False}, "xla"),
        ({"dtype": "mixed"}, "pallas"),  # cuDNN needs one dtype for q, k and v
    ],
)
def test_table(kw, impl):
    assert dispatch.choose(_call(**kw))[0] == impl


def test_measured_entry_overrides_the_table_near_its_length():
    entry = dict(
        device=H100.lower(),
        dtype="bfloat16",
        head_dim=128,
        causal=True,
        seq_len=2048,
        best="pallas",
        measured="2026-11-27 jax 0.11.2",
    )
    assert dispatch.choose(_call(q_len=2048, kv_len=2048), [entry]) == (
        "pallas",
        "measured 2026-11-27 jax 0.11.2 at seq 2048",
    )
    assert dispatch.choose(_call(q_len=4096, kv_len=4096), [entry])[0] == "pallas"
    # Out of reach (x8 longer), another head dim, non-causal, another card: the table decides.
    for kw in ({"q_len": 16384, "kv_len": 16384}, {"head_dim": 64}, {"causal": False}):
        assert dispatch.choose(_call(**kw), [entry])[0] == "cudnn", kw
    assert dispatch.choose(_call(device_kind=B200, q_len=2048, kv_len=2048), [entry])[0] == "cudnn"
    # A measured winner that cannot take this call (segments: no cuDNN) is not used.
    cudnn_entry = {**entry, "best": "cudnn"}
    assert dispatch.choose(_call(q_len=2048, kv_len=2048, segments=True), [cudnn_entry])[0] == (
        "pallas"
    )


def test_measured_file_is_read_and_a_damaged_one_named(tmp_path, monkeypatch):
    entry = dict(device="x", dtype="bfloat16", head_dim=128, causal=True, seq_len=2048)
    good = tmp_path / "m.json"
    good.write_text(json.dumps({"entries": [{**entry, "best": "pallas"}]}))
    assert dispatch.measured_entries(str(good)) == ({**entry, "best": "pallas"},)
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


def test_auto_under_an_abstract_h100_picks_pallas_and_logs_why(monkeypatch, caplog):
    """Lowered for an abstract H100 from a CPU host, auto takes the Pallas kernel (cuDNN's checks
    need the real device) and logs the reason once; on the CPU itself it stays on XLA."""
    monkeypatch.setattr(registry, "_LOGGED", set())
    q = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
    f = jax.jit(lambda q: ops.attention(q, q, q, causal=True, impl="auto"))
    with caplog.at_level(logging.INFO, logger="framework.ops"):
        with jax.sharding.use_abstract_mesh(abstract_gpu_mesh({"x": 1})):
            f.trace(q)
        f.trace(q)
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ops.attention")]
    assert len(chosen) == 2, chosen
    assert "chose pallas" in chosen[0] and "hopper table" in chosen[0], chosen
    assert "chose xla" in chosen[1] and "cpu: not compiling for a GPU" in chosen[1], chosen


# ---------------------------------------------------------------------------------------------
# Compiled on a GPU (scripts/gpu_check.sh runs these; deselected on CPU by `-m 'not gpu'`).


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cudnn", "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_and_auto_match_the_reference_on_gpu(impl, causal):
    """The path auto takes on Hopper (cuDNN) and auto itself: values and gradients, GQA 4."""
    from test_flash_attention import _assert_close, _inputs, _value_and_grads

    from pallas_kernels.flash_attention import attention_reference

    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    q, k, v, do = _inputs(1, 2, 1024, 1024, 8, 2, 128, jnp.bfloat16)
    kw = dict(causal=causal)
    got = _value_and_grads(
        lambda q, k, v, **a: ops.attention(q, k, v, impl=impl, **a), q, k, v, do, kw
    )
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = [w.astype(jnp.bfloat16) for w in _value_and_grads(attention_reference, *f32, kw)]
    _assert_close(got, want, jnp.bfloat16)
