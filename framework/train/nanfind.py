"""Where a forward pass first made a non-finite value: the function re-run from its jaxpr
with finiteness checks between its named layers.

`first_made(fn, sites)(*args)` returns `fn`'s output and (site, iteration): the first run of
operations in one named scope (a layer: `blocks[1]/mlp`) whose inputs were finite and whose
results passed on were not (-1: none), and the iteration of the outermost scan it ran in (the
layer index for blocks under `lax.scan`). Propagation is not blamed: a layer whose inputs
already hold a NaN/inf is not the one that made it. Calls (jit, remat, custom_jvp/vjp) are
entered and a scan's body is checked per iteration; anything else (kernels, loops) counts as
one operation. `sites.name` turns a site into its scope path. Each check is a reduction the
compiler must build, so this is compiled only to explain a step already found non-finite
(`nonfinite.made_in_forward`), never into the train step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

NONE = -1
LAYER = "[#]"  # in a site's name: where the index of the outermost scan iteration goes
_CALLS = {  # call-like primitives whose body takes the equation's inputs as they are
    "jit", "pjit", "closed_call", "core_call", "checkpoint", "remat",
    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
}  # fmt: skip
_MOVES = {  # primitives that move, select or compare values but cannot make a NaN/inf
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice",
    "dynamic_slice", "dynamic_update_slice", "concatenate", "copy", "copy_p", "select_n",
    "sharding_constraint", "mesh_cast", "rev", "pad", "reduce_max", "reduce_min", "max", "min",
    "stop_gradient", "iota", "eq", "ne", "lt", "gt", "le", "ge", "and", "or", "not", "xor",
    "argmax", "argmin", "is_finite", "abs", "neg", "sign", "floor", "ceil", "round", "clamp",
    "optimization_barrier", "random_bits", "random_wrap", "random_unwrap", "random_seed",
    "random_fold_in", "threefry2x32", "shift_right_logical", "shift_left", "population_count",
}  # fmt: skip


class Sites:
    """Scope paths of checked layers, one index per path (stable if a body is traced twice)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.names: list[str] = []

    def add(self, prefix: str, scope: str) -> int:
        name = "/".join(s for s in (prefix, scope) if s) or "(top level)"
        if name not in self.index:
            self.index[name] = len(self.names)
            self.names.append(name)
        return self.index[name]

    def name(self, site: int, iteration: int) -> str:
        """The scope path of `site`, with the scan iteration it was made in."""
        return self.names[site].replace(LAYER, f"[{iteration}]")


def _layer(eqn: Any) -> str:
    """The first component of an equation's named scope (its layer within this jaxpr)."""
    return str(eqn.source_info.name_stack).split("/")[0]


def _scope(prefix: str, eqn: Any) -> str:
    return "/".join(s for s in (prefix, str(eqn.source_info.name_stack)) if s)


def _is_var(v: Any) -> bool:
    return not hasattr(v, "val")  # Literals carry a value; Vars do not


def _finite(x: Any) -> jax.Array:
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.bool_(True)
    return jnp.all(jnp.isfinite(x))


def _all(flags: Sequence[Any]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.bool_(True), *flags]))


def _inner(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """(jaxpr, consts) of a call-like equation, else None."""
    if eqn.primitive.name not in _CALLS:
        return None
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(name)
        jaxpr, consts = getattr(inner, "jaxpr", inner), getattr(inner, "consts", ())
        if hasattr(jaxpr, "eqns") and len(jaxpr.invars) == len(eqn.invars):
            return jaxpr, consts
    return None


def earliest(found: tuple, new: tuple) -> tuple:
    """Keep `found` (site, iteration) unless it is empty and `new` is not."""
    take = (found[0] == NONE) & (new[0] != NONE)
    return tuple(jnp.where(take, n, f) for f, n in zip(found, new, strict=True))


def _earliest_of(found: Sequence[tuple]) -> tuple:
    """The first (site, iteration) with a site, in program order; (NONE, NONE) if none."""
    if not found:
        return jnp.int32(NONE), jnp.int32(NONE)
    sites, iters = (jnp.stack([jnp.asarray(f[k], jnp.int32) for f in found]) for k in (0, 1))
    first = jnp.argmax(sites != NONE)
    return sites[first], iters[first]


def _scan_inputs(params: dict, args: list) -> tuple[list, list, list]:
    """A scan's inputs split into (constants, carries, scanned): by counts up to jax 0.11,
    then by its input tree `ft_in` (as jax's own scan implementation splits them)."""
    if "num_consts" in params:
        n_c, n_carry = params["num_consts"], params["num_carry"]
        return args[:n_c], args[n_c : n_c + n_carry], args[n_c + n_carry :]
    consts, carry, xs = params["ft_in"].update(args).unpack()
    return list(consts), list(carry), list(xs)


def _scan(eqn: Any, args: list, sites: Sites, prefix: str) -> tuple[list, tuple]:
    """A scan re-run with its body checked; the outermost scan records its iteration."""
    p = eqn.params
    body, body_consts = getattr(p["jaxpr"], "jaxpr", p["jaxpr"]), getattr(p["jaxpr"], "consts", ())
    consts, init, xs = _scan_inputs(p, args)
    n_carry = len(init)
    outermost = LAYER not in prefix
    scope = _scope(prefix, eqn) + (LAYER if outermost else "")

    def step(carry, x):
        c, found, i = carry
        outs, (site, inner_i) = _eval(body, body_consts, [*consts, *c, *x], sites, scope)
        layer = (p["length"] - 1 - i if p["reverse"] else i) if outermost else inner_i
        found = earliest(found, (site, layer))
        return (outs[:n_carry], found, i + 1), outs[n_carry:]

    start = (jnp.int32(NONE), jnp.int32(NONE))
    (carry, found, _), ys = jax.lax.scan(
        step, (init, start, jnp.int32(0)), xs, length=p["length"], reverse=p["reverse"]
    )
    return [*carry, *ys], found


class _Checker:
    """Checks one jaxpr by segments: runs of operations in one named layer. A segment made a
    NaN/inf when its inputs were finite and a value it passes on is not; each value's
    finiteness is reduced at most once, and segments that only move values are not checked."""

    def __init__(self, jaxpr: Any, env: dict, sites: Sites, prefix: str):
        self.jaxpr, self.env, self.sites, self.prefix = jaxpr, env, sites, prefix
        self.users: dict[Any, set[int]] = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if _is_var(v):
                    self.users.setdefault(v, set()).add(i)
        self.returned = {v for v in jaxpr.outvars if _is_var(v)}
        self.ok: dict[Any, jax.Array] = {}
        self.segment: list[int] = []
        self.found: list[tuple] = []

    @property
    def scope(self) -> str:
        return _layer(self.jaxpr.eqns[self.segment[0]])

    def read(self, v: Any) -> Any:
        return self.env[v] if _is_var(v) else v.val

    def finite(self, vs: Sequence[Any]) -> jax.Array:
        for v in vs:
            if v not in self.ok:
                self.ok[v] = _finite(self.env[v])
        return _all([self.ok[v] for v in vs])

    def flush(self) -> None:
        """Check the segment collected so far and start a new one."""
        eqns = [self.jaxpr.eqns[i] for i in self.segment]
        inside = set(self.segment)
        made_here = {v for e in eqns for v in e.outvars}
        ins = {v for e in eqns for v in e.invars if _is_var(v) and v not in made_here}
        outs = {v for v in made_here if v in self.returned or self.users.get(v, set()) - inside}
        if any(e.primitive.name not in _MOVES for e in eqns):
            made = self.finite(sorted(ins, key=id)) & ~self.finite(sorted(outs, key=id))
            site = self.sites.add(self.prefix, self.scope)
            self.found.append((jnp.where(made, site, NONE), NONE))
        self.segment = []


def _eval(
    jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], sites: Sites, prefix: str
) -> tuple[list, tuple]:
    """`jaxpr`'s outputs and the (site, iteration) where it first made a NaN/inf."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    check = _Checker(jaxpr, env, sites, prefix)
    for i, eqn in enumerate(jaxpr.eqns):
        ins = [check.read(v) for v in eqn.invars]
        inner = _inner(eqn)
        if eqn.primitive.name == "scan" or inner is not None:
            check.flush()
            if inner is None:
                outs, new = _scan(eqn, ins, sites, prefix)
            else:
                outs, new = _eval(*inner, ins, sites, _scope(prefix, eqn))
            check.found.append(new)
        else:
            if check.segment and _layer(eqn) != check.scope:
                check.flush()
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
            check.segment.append(i)
        env.update(zip(eqn.outvars, outs, strict=True))
    check.flush()
    return [check.read(v) for v in jaxpr.outvars], _earliest_of(check.found)


def first_made(fn: Callable, sites: Sites) -> Callable:
    """`fn(*args) -> (out, (site, iteration))`: `fn` re-run with checks (see the module
    docstring); site -1 where nothing non-finite was made."""

    def run(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs, found = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), sites, "")
        return jax.tree.unflatten(jax.tree.structure(shapes), outs), found

    return run
