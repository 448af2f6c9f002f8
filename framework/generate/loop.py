"""Generation with a KV cache: one prefill over the right-padded prompts, then a jitted
`lax.while_loop` whose body is one `transformer.decode` step per token over a preallocated cache
(donated, so it is updated in place), stopping once every row has emitted EOS.

Rows of different prompt lengths share the batch: row b's prompt fills cache positions
0..len_b-1 (padding after it is overwritten by its own decode steps before anything attends to
it) and its first new token comes from the prefill logits at its last real token. Under a mesh
the params and the cache are placed with NamedSharding from their logical axes (tensor-parallel
heads, data-parallel batch), the batch is padded to a multiple of the batch axes, and the model
is traced with the mesh's rules active."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from framework import nn
from framework.errors import ConfigError
from framework.generate.sampling import Sampling, row_keys, sample
from framework.models import transformer
from framework.models.transformer import TransformerConfig
from framework.parallel import logical
from framework.parallel.mesh import DEFAULT_RULES, axis_size
from framework.parallel.sharding import logical_shardings

NO_EOS = -1  # an id no token has
BUCKET = 8  # prompt width and new-token count round up to this: fewer distinct programs


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def check_lengths(cfg: TransformerConfig, lengths: Sequence[int], max_new_tokens: int) -> None:
    """ConfigError if a prompt (plus what is generated, for learned positions) does not fit the
    model's context (cfg.max_seq_len)."""
    longest = max(lengths)
    if cfg.position == "learned" and longest + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
            f"context of {cfg.max_seq_len} tokens (learned positions)"
        )
    if longest > cfg.max_seq_len:
        raise ConfigError(
            f"prompt of {longest} tokens is longer than the model's context of "
            f"{cfg.max_seq_len} tokens"
        )


def _check_prompts(cfg: TransformerConfig, prompts: Sequence[Sequence[int]]) -> None:
    if not prompts:
        raise ConfigError("no prompt given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty (give at least one token)")
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ConfigError(
                f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})"
            )


def _eos_array(eos_id: int | Sequence[int] | None) -> np.ndarray:
    """EOS ids padded with NO_EOS to a multiple of 4 (one program for one to four ids)."""
    ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, int | np.integer) else eos_id
    ids = [int(i) for i in ids] or [NO_EOS]
    return np.asarray(ids + [NO_EOS] * (-len(ids) % 4), np.int32)


def _traced(fn, layout):
    """`fn` traced with the mesh's logical rules active (a no-op without a mesh)."""
    if layout is None:
        return fn

    def wrapped(*args):
        with logical.activate(layout[0], dict(layout[1])):
            return fn(*args)

    return wrapped


@functools.lru_cache(maxsize=16)
def _programs(cfg_json: str, mode: str, layout: tuple | None):
    """(prefill, decode loop), jitted for one model config, mesh layout and sampling mode:
    "greedy" (argmax only), "sample" (temperature) or "filter" (also top-k/top-p: a sort of the
    vocabulary per step). Temperature, k and p are traced: any values share the program."""
    cfg = TransformerConfig.model_validate_json(cfg_json)

    def pick(logits, keys, knobs):
        temperature, top_k, top_p = knobs
        if mode == "greedy":
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if mode == "sample":
            return sample(logits, keys, temperature=temperature)
        return sample(logits, keys, temperature=temperature, top_k=top_k, top_p=top_p)

    def replicated(x):
        return logical.constrain(x, (None,) * x.ndim)

    def constrain_cache(cache):
        return jax.tree.map(lambda c: logical.constrain(c, transformer.CACHE_AXES), cache)

    def prefill(params, cache, tokens, lengths, key, knobs):
        batch, width = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
        # only each row's last prompt token is unembedded: full prefill logits would be
        # [batch, prompt, vocab] (GBs for long prompts and 128k vocabularies)
        logits, cache = transformer.decode(
            params, tokens, cfg, cache=cache, positions=positions, last=lengths - 1
        )
        first = pick(logits[:, 0], row_keys(key, 0, batch), knobs)
        return replicated(first), constrain_cache(cache)

    def decode_loop(params, cache, first, lengths, done, out, limit, key, knobs, eos):
        batch = out.shape[0]
        out = out.at[:, 0].set(first)
        done = done | jnp.isin(first, eos)

        def cond(carry):
            i, _, _, done, _ = carry
            return (i < limit) & ~jnp.all(done)

        def body(carry):
            i, cache, last, done, out = carry
            positions = (lengths + i - 1)[:, None]
            logits, cache = transformer.decode(
                params, last[:, None], cfg, cache=cache, positions=positions
            )
            tok = pick(logits[:, 0], row_keys(key, i, batch), knobs)
            tok = jnp.where(done, eos[0], tok)
            out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
            return i + 1, constrain_cache(cache), tok, done | jnp.isin(tok, eos), out

        carry = (jnp.int32(1), cache, first, done, out)
        steps, cache, _, _, out = jax.lax.while_loop(cond, body, carry)
        return replicated(out), steps, constrain_cache(cache)

    return (
        jax.jit(_traced(prefill, layout), donate_argnums=1),
        jax.jit(_traced(decode_loop, layout), donate_argnums=1),
    )


def _layout(mesh: Mesh | None, rules: Mapping[str, Any] | None) -> tuple | None:
    if mesh is None:
        return None
    # decoding runs one token per step: no sequence parallelism
    rules = {**(DEFAULT_RULES if rules is None else rules), "seq": None}
    return mesh, tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items())
    )


def place_params(
    params: Any, cfg: TransformerConfig, mesh: Mesh | None = None, rules: Mapping | None = None
) -> Any:
    """Params on the default device, or sharded over `mesh` by their logical axes."""
    if mesh is None:
        return jax.device_put(params)
    rules = dict(DEFAULT_RULES if rules is None else rules)
    axes = nn.logical_axes(transformer.spec(cfg))
    return jax.device_put(params, logical_shardings(axes, params, mesh, rules, "param"))


@functools.lru_cache(maxsize=16)
def _cache_maker(cfg_json: str, batch: int, length: int, layout: tuple | None):
    """A jitted maker of an empty cache (placed over the mesh): compiled once per shape, not
    once per `generate` call."""
    cfg = TransformerConfig.model_validate_json(cfg_json)
    make = functools.partial(transformer.init_cache, cfg, batch, length)
    if layout is None:
        return jax.jit(make)
    mesh, rules = layout[0], dict(layout[1])
    shapes = jax.eval_shape(make)
    axes = jax.tree.map(lambda _: transformer.CACHE_AXES, shapes)
    shardings = logical_shardings(axes, shapes, mesh, rules, "KV cache")
    return jax.jit(make, out_shardings=shardings)


def _new_cache(cfg: TransformerConfig, batch: int, length: int, layout: tuple | None) -> dict:
    """An empty KV cache [n_layers, batch, length, kv_heads, head_dim] (sharded under a mesh)."""
    return _cache_maker(cfg.model_dump_json(), batch, length, layout)()


def _put(x: np.ndarray, layout: tuple | None, axes: tuple) -> jax.Array:
    """A host array (the same on every process) on the device, or laid out over the mesh."""
    if layout is None:
        return jnp.asarray(x)
    mesh, rules = layout[0], dict(layout[1])
    sharding = NamedSharding(mesh, logical.partition_spec(axes, rules))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def generate(
    params: Any,
    cfg: TransformerConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """New tokens per prompt (each stopped after its first EOS, inclusive, or at
    max_new_tokens). temperature 0 = greedy; top_k / top_p filter before sampling; `eos_id` is
    one id or several; under `mesh` (with logical `rules`, default the mesh defaults) params,
    cache and batch are sharded. ConfigError for prompts that do not fit the context."""
    Sampling(temperature, top_k, top_p)  # ConfigError for values out of range
    # filters that keep every token are no filters (transformers skips them too): no sort per
    # step, and no f32 rounding of a cumulative mass of 1.0 dropping the least likely tokens
    sampling = Sampling(
        temperature,
        None if top_k is None or top_k >= cfg.vocab_size else top_k,
        None if top_p is None or top_p >= 1 else top_p,
    )
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_prompts(cfg, prompts)
    lengths = [len(p) for p in prompts]
    check_lengths(cfg, lengths, max_new_tokens)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    layout = _layout(mesh, rules)
    n = len(prompts)
    batch = n
    if layout is not None:
        shards = axis_size(mesh, logical.partition_spec(("batch",), dict(layout[1]))[0])
        batch = _round_up(n, shards)
    width = min(_round_up(max(lengths), BUCKET), cfg.max_seq_len)  # >= every prompt (checked)
    steps = _round_up(max_new_tokens, BUCKET)
    tokens = np.zeros((batch, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lens = np.ones(batch, np.int32)
    lens[:n] = lengths
    done = np.arange(batch) >= n  # rows added to fill the mesh are finished from the start
    length = width + steps  # >= every position written: a row's last is len + max_new - 2

    mode = "greedy" if temperature == 0 else "filter" if sampling.filtered else "sample"
    prefill, decode_loop = _programs(cfg.model_dump_json(), mode, layout)
    params = place_params(params, cfg, mesh, rules)
    cache = _new_cache(cfg, batch, length, layout)
    key = jax.random.key(0) if key is None else key
    eos = _eos_array(eos_id)
    knobs = (
        np.float32(temperature),
        np.int32(cfg.vocab_size if sampling.top_k is None else sampling.top_k),
        np.float32(2.0 if sampling.top_p is None else sampling.top_p),  # > 1: keeps every token
    )
    lens_d = _put(lens, layout, ("batch",))
    first, cache = prefill(params, cache, _put(tokens, layout, ("batch", None)), lens_d, key, knobs)
    out = _put(np.zeros((batch, steps), np.int32), layout, ("batch", None))
    done_d = _put(done, layout, ("batch",))
    limit = np.int32(max_new_tokens)
    out, _, _ = decode_loop(params, cache, first, lens_d, done_d, out, limit, key, knobs, eos)
    return [_until_eos(row[:max_new_tokens], eos) for row in np.asarray(out)[:n]]


def _until_eos(row: np.ndarray, eos: np.ndarray) -> list[int]:
    hits = np.flatnonzero(np.isin(row, eos))
    return [int(t) for t in (row if hits.size == 0 else row[: hits[0] + 1])]


def generate_long(
    params: Any,
    cfg: TransformerConfig,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    context: int,
    key: jax.Array | None = None,
    **kwargs: Any,
) -> list[int]:
    """`max_new_tokens` after one prompt, even past `context` tokens (at most cfg.max_seq_len):
    when the context is full, generation restarts from its last context // 2 tokens (a new
    prefill). For end-of-run samples longer than the trained sequence; `kwargs` go to
    `generate`."""
    context = min(context, cfg.max_seq_len)
    keep = max(1, context // 2)
    key = jax.random.key(0) if key is None else key
    ctx = list(prompt)[-max(1, context - 1) :]
    new: list[int] = []
    chunk = 0
    while len(new) < max_new_tokens:
        room = max(1, context - len(ctx))
        if chunk == 0:  # the first chunk stops where asked; later ones share one program
            room = min(room, max_new_tokens)
        got = generate(
            params, cfg, [ctx], max_new_tokens=room, key=jax.random.fold_in(key, chunk), **kwargs
        )[0]
        new += got
        chunk += 1
        if len(got) < room:  # stopped at EOS
            break
        ctx = (ctx + got)[-keep:]
    return new[:max_new_tokens]
