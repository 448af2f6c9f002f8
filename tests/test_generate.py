"""Generation with a KV cache: cached decode logits equal the full forward's at every step (GQA +
RoPE, GPT-2 learned positions, a sliding window), greedy equals the full forward's argmax,
the sampling filters, EOS and max_new_tokens, mesh sharding equal to one device, and
scripts/generate.py on a tiny run directory (bad input: one line, exit 2)."""

import functools
import importlib.util
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import nn
from framework.errors import ConfigError
from framework.generate import filter_logits, generate, generate_long, sample
from framework.generate import loop as gen_loop
from framework.models import transformer
from framework.models.transformer import TransformerConfig
from framework.parallel.mesh import DEFAULT_RULES, MeshConfig, make_mesh

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
LLAMA = TransformerConfig(
    **TINY,
    n_kv_heads=2,
    position="rope",
    norm="rmsnorm",
    activation="swiglu",
    bias=False,
    tie_embeddings=False,
)
GPT2 = TransformerConfig(**TINY)  # learned positions, LayerNorm, GELU, biases, tied
MISTRAL = LLAMA.model_copy(update={"sliding_window": 4})
PROMPTS = [[5, 9, 2, 33, 17], [8, 1, 60], [3, 3, 41, 7, 22, 50, 11]]  # lengths 5, 3, 7
NEW = 6


def _random_params(cfg: TransformerConfig, seed: int = 1) -> dict:
    """Host params of the model's shapes (numpy: no initializer to compile); norm scales ~1."""
    rng = np.random.default_rng(seed)

    def one(path, shape):
        base = 1.0 if jax.tree_util.keystr(path).endswith("'scale']") else 0.0
        return (base + 0.2 * rng.standard_normal(shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, nn.shapes(transformer.spec(cfg)))


@functools.cache
def _params(cfg: TransformerConfig):
    return _random_params(cfg)


# XLA:CPU without its expensive passes (as tests/test_hf.py): less compile time, same f32 math
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
    """`fn` jitted and compiled for these arguments' shapes with FAST_COMPILE."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


@functools.cache
def _forward_compiled(cfg: TransformerConfig, shape: tuple):
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
    return _compiled(lambda p, t: transformer.apply(p, t, cfg)[0], _params(cfg), tokens)


def _forward(cfg: TransformerConfig):
    """Full-forward logits of [batch, seq] int32 tokens (one fast compile per shape)."""
    return lambda params, tokens: _forward_compiled(cfg, tokens.shape)(params, tokens)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2, MISTRAL], ids=["llama_gqa_rope", "gpt2", "window"])
def test_cached_decode_logits_equal_full_forward_at_every_step(cfg):
    params = _params(cfg)
    total = 13  # = longest prompt + NEW: the greedy reference reuses the compiled forward
    seqs = np.random.default_rng(0).integers(0, cfg.vocab_size, (len(PROMPTS), total))
    lengths = np.array([len(p) for p in PROMPTS])
    width = lengths.max()
    with jax.default_matmul_precision("highest"):
        full = np.asarray(_forward(cfg)(params, jnp.asarray(seqs, jnp.int32)))
        cache = transformer.init_cache(cfg, len(PROMPTS), total)
        decode = lambda p, t, c, q: transformer.decode(p, t, cfg, cache=c, positions=q)
        padded = np.where(np.arange(width) < lengths[:, None], seqs[:, :width], 0)
        padded = padded.astype(np.int32)
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), padded.shape)
        logits, cache = _compiled(decode, params, padded, cache, positions)(
            params, padded, cache, positions
        )
        column = np.zeros((len(PROMPTS), 1), np.int32)
        step = _compiled(decode, params, column, cache, column)
        errs = [
            np.abs(np.asarray(logits)[b, : lengths[b]] - full[b, : lengths[b]]).max()
            for b in range(len(PROMPTS))
        ]
        for s in range(total - width):  # one token per row per step, rows at their own position
            pos = (lengths + s).astype(np.int32)
            tok = seqs[np.arange(len(PROMPTS)), pos].astype(np.int32)
            logits, cache = step(params, tok[:, None], cache, pos[:, None])
            errs.append(np.abs(np.asarray(logits)[:, 0] - full[np.arange(len(PROMPTS)), pos]).max())
    assert max(errs) < 1e-5, errs


def _greedy_reference(cfg, params, prompts, n):
    """Greedy tokens by argmax of the full forward, one token at a time (fixed-width jit)."""
    seqs = [list(p) for p in prompts]
    buf = np.zeros((len(prompts), max(map(len, prompts)) + n), np.int32)
    for _ in range(n):
        for b, seq in enumerate(seqs):
            buf[b, : len(seq)] = seq
        logits = np.asarray(_forward(cfg)(params, buf))
        for b, seq in enumerate(seqs):
            seq.append(int(np.argmax(logits[b, len(seq) - 1])))
    return [seq[len(p) :] for seq, p in zip(seqs, prompts, strict=True)]


@functools.cache
def _llama_greedy():
    return generate(_params(LLAMA), LLAMA, PROMPTS, max_new_tokens=NEW, temperature=0)


def test_greedy_equals_full_forward_argmax_and_max_new_tokens():
    got = _llama_greedy()
    assert got == _greedy_reference(LLAMA, _params(LLAMA), PROMPTS, NEW)
    assert [len(r) for r in got] == [NEW] * len(PROMPTS)


def test_eos_stops_a_row_while_the_others_continue():
    greedy = _llama_greedy()
    for eos in sorted({t for row in greedy for t in row}):
        want = [row[: row.index(eos) + 1] if eos in row else row for row in greedy]
        if len({len(r) for r in want}) > 1 and NEW in {len(r) for r in want}:
            break
    else:
        pytest.skip("no token ends one row early and leaves another running")
    got = generate(_params(LLAMA), LLAMA, PROMPTS, max_new_tokens=NEW, temperature=0, eos_id=eos)
    assert got == want
    # several EOS ids: the first of either ends a row
    assert generate(
        _params(LLAMA), LLAMA, PROMPTS, max_new_tokens=NEW, temperature=0, eos_id=[63, eos]
    ) == [r[: min([r.index(e) + 1 for e in (63, eos) if e in r] or [NEW])] for r in greedy]


def test_a_repeated_call_compiles_nothing(caplog):
    """The programs, the empty cache included, are compiled once per shape, not per call."""
    want = _llama_greedy()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        got = generate(_params(LLAMA), LLAMA, PROMPTS, max_new_tokens=NEW, temperature=0)
    assert got == want
    compiled = [r.getMessage() for r in caplog.records if "XLA compilation" in r.getMessage()]
    assert not compiled, compiled


def test_filters_that_keep_every_token_are_no_filters(monkeypatch):
    """top_p=1 and top_k >= the vocabulary take the temperature-only program (no sort per step,
    no f32 cumulative mass dropping the least likely tokens), with the same draws."""
    modes = []
    programs = gen_loop._programs

    def recording(cfg_json, mode, layout):
        modes.append(mode)
        return programs(cfg_json, mode, layout)

    monkeypatch.setattr(gen_loop, "_programs", recording)
    kw = dict(max_new_tokens=NEW, key=jax.random.key(5))
    plain = generate(_params(LLAMA), LLAMA, PROMPTS, **kw)
    assert generate(_params(LLAMA), LLAMA, PROMPTS, top_p=1.0, top_k=64, **kw) == plain
    assert modes == ["sample", "sample"]  # (top_k=1 filtering: test_sharded_generation...)


_filter_traced = jax.jit(lambda x, t, k, p: filter_logits(x, temperature=t, top_k=k, top_p=p))


def _filter(logits, temperature=1.0, top_k=None, top_p=None):
    """filter_logits with every knob traced (k = vocab, p = 2 stand for "none"): one compile."""
    top_k = logits.shape[-1] if top_k is None else top_k
    return _filter_traced(logits, temperature, top_k, 2.0 if top_p is None else top_p)


def _kept(logits, **kw):
    return set(np.flatnonzero(np.isfinite(np.asarray(_filter(logits, **kw))[0])).tolist())


def test_filters_on_hand_built_logits():
    ties = jnp.array([[1.0, 3.0, 2.0, 3.0, 0.0]])
    assert _kept(ties, top_k=1) == {1}  # exactly k, ties to the lower index
    assert _kept(ties, top_k=2) == {1, 3}
    assert _kept(ties, top_k=3) == {1, 2, 3}
    assert _kept(ties, top_k=5) == set(range(5))
    probs = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3, 0.0]]))
    for p, want in [(0.3, {1}), (0.5, {1}), (0.79, {1, 3}), (0.81, {0, 1, 3}), (1.0, {0, 1, 2, 3})]:
        assert _kept(probs, top_p=p) == want, p  # the minimal nucleus with mass >= p
    assert _kept(probs, top_p=1e-9) == {1}  # always at least one token
    # top-p after top-k, over the renormalized survivors: 0.5 / 0.8 = 0.625 alone reaches 0.6
    assert _kept(probs, top_k=2, top_p=0.6) == {1}
    assert _kept(probs, top_k=2, top_p=0.7) == {1, 3}
    scaled = np.asarray(_filter(probs, temperature=0.5))
    np.testing.assert_allclose(scaled[0, :4], np.asarray(probs)[0, :4] * 2, rtol=1e-6)
    # the unjitted, untraced form (no filter at all) is the same function
    np.testing.assert_allclose(np.asarray(filter_logits(ties, temperature=2.0)), ties / 2)


def test_sampling_draws_only_kept_tokens_with_softmax_frequencies():
    logits = jnp.tile(jnp.log(jnp.array([0.15, 0.5, 0.05, 0.3])), (4000, 1))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(lambda t, k, p: sample(logits, keys, temperature=t, top_k=k, top_p=p))
    freq = np.bincount(np.asarray(draw(1.0, 4, 2.0)), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.15, 0.5, 0.05, 0.3], atol=0.03)
    assert set(np.asarray(draw(1.0, 2, 2.0)).tolist()) == {1, 3}
    assert set(np.asarray(draw(1.0, 4, 0.79)).tolist()) == {1, 3}
    assert set(np.asarray(draw(0.0, 4, 2.0)).tolist()) == {1}  # temperature 0: argmax


def test_sharded_generation_equals_unsharded():
    """Tensor-parallel heads (2) x data-parallel batch (4; 3 prompts padded to 4), sampling
    through the top-k/top-p program: top_k=1 and a tiny top_p give the unsharded greedy
    tokens; a sampled row draws from its own key (the other rows change nothing in it)."""
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    params, key = _params(LLAMA), jax.random.key(3)
    kw = dict(max_new_tokens=NEW, key=key, mesh=mesh)
    assert generate(params, LLAMA, PROMPTS, top_k=1, **kw) == _llama_greedy()
    assert generate(params, LLAMA, PROMPTS, top_p=1e-6, **kw) == _llama_greedy()
    rows = generate(params, LLAMA, PROMPTS, top_k=20, top_p=0.9, **kw)
    others = generate(params, LLAMA, [PROMPTS[0], [1], [2, 3]], top_k=20, top_p=0.9, **kw)
    assert others[0] == rows[0] and rows != _llama_greedy()
    placed = gen_loop.place_params(params, LLAMA, mesh)
    assert placed["blocks"]["attn"]["k"]["kernel"].sharding.spec[2] == "tensor"
    layout = gen_loop._layout(mesh, DEFAULT_RULES)
    cache = gen_loop._new_cache(LLAMA, 4, 16, layout)
    spec = cache["k"].sharding.spec
    assert spec[1] in ("data", ("data", "fsdp")) and spec[3] == "tensor", spec


def test_context_limits():
    with pytest.raises(ConfigError, match="exceeds the model's context of 32"):
        generate(_params(GPT2), GPT2, [[1] * 30], max_new_tokens=3)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        generate(_params(LLAMA), LLAMA, [[1] * 33], max_new_tokens=1)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        generate(_params(LLAMA), LLAMA, [[64]], max_new_tokens=1)
    with pytest.raises(ConfigError, match="top_p"):
        generate(_params(LLAMA), LLAMA, [[1]], max_new_tokens=1, top_p=0.0)


# ----------------------------------------------------------------------------------------------
# scripts/generate.py


@functools.cache
def _script():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts/generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as training leaves it: resolved config.yaml and one checkpoint."""
    from framework.config import load_config
    from framework.config.loader import dump_resolved
    from framework.train.checkpoint import CheckpointConfig, Checkpointer
    from framework.train.config import Config

    root = tmp_path_factory.mktemp("gen")
    overrides = ["data.source=text", "data.paths=[stdlib]", "model.vocab_size=256"]
    cfg = load_config(Config, ROOT / "configs/tiny/lm.yaml", [*overrides, f"run.dir={root}"])
    run = root / cfg.run.name
    dump_resolved(cfg, run)
    params = _random_params(cfg.model, seed=0)
    writer = Checkpointer(run / "checkpoints", CheckpointConfig())
    state = {"params": params, "opt_state": {}, "model_state": {}}
    writer.save(state, {}, cfg.model_dump(mode="json"), {"step": 3})
    writer.close()
    return run


def _cli(capsys, *argv):
    try:
        code = _script().main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_continuation(run_dir, capsys):
    code, out, err = _cli(
        capsys, run_dir, "--prompt", "def ", "--max-new-tokens", 5, "--temperature", 0
    )
    assert code == 0, err
    loaded = _script().load(str(run_dir))
    ids = generate(loaded.params, loaded.cfg, [list(b"def ")], max_new_tokens=5, temperature=0)
    assert out == bytes(ids[0]).decode("utf-8", errors="replace") + "\n"


@pytest.mark.parametrize(
    "args, needle",
    [
        (("{missing}", "--prompt", "x"), "is not a directory"),
        (("{empty}", "--prompt", "x"), "no checkpoints"),
        (("{hf}", "--prompt", "x"), ""),  # an unsupported architecture (or no framework.hf)
        (("{run}", "--prompt", "x" * 40), "exceeds the model's context of 32"),
        (("{run}", "--prompt", "x", "--max-new-tokens", "40"), "exceeds the model's context"),
        (("{run}", "--prompt", ""), "prompt is empty"),
        (("{run}", "--prompt", "x", "--step", "9"), "no checkpoint for step 9"),
        (("{run}", "--prompt", "x", "--top-p", "1.5"), "--top-p"),
        (("{run}", "--prompt", "x", "--top-k", "0"), "--top-k"),
        (("{run}", "--prompt", "x", "--temperature", "-1"), "--temperature"),
        (("{run}", "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens"),
        (("{run}",), "--prompt"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(run_dir, tmp_path, capsys, args, needle):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "nonesuch"}))
    where = dict(missing=tmp_path / "missing", empty=tmp_path / "empty", hf=tmp_path / "hf")
    where["run"] = run_dir
    code, out, err = _cli(capsys, *[a.format(**where) for a in args])
    assert code == 2 and not out, (code, out, err)
    assert len(err.strip().splitlines()) == 1 and needle.format(**where) in err, err


def test_cli_invalid_model_section_exits_2_with_one_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    text = (bad / "config.yaml").read_text()
    assert re.search(r"(?m)^  d_model: ", text)
    (bad / "config.yaml").write_text(re.sub(r"(?m)^  d_model: .*$", "  d_model: -3", text))
    code, out, err = _cli(capsys, bad, "--prompt", "x")
    assert code == 2 and not out, (code, out, err)
    assert len(err.strip().splitlines()) == 1 and "d_model" in err, err


def test_generate_long_restarts_past_the_context(run_dir):
    """(On the CLI test's model: the same compiled programs.)"""
    loaded = _script().load(str(run_dir))
    params, cfg, prompt = loaded.params, loaded.cfg, PROMPTS[0]
    new = generate_long(params, cfg, prompt, max_new_tokens=14, context=8, temperature=0)
    assert len(new) == 14
    first = generate(params, cfg, [prompt], max_new_tokens=3, temperature=0)[0]
    assert new[:3] == first  # the first chunk fills the context: 5 prompt + 3 new
    restart = generate(params, cfg, [(prompt + first)[-4:]], max_new_tokens=4, temperature=0)
    assert new[3:7] == restart[0]  # then it restarts from the last context // 2 tokens
