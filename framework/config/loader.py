"""YAML config loading: `base:` inheritance, `a.b=value` overrides, one-line validation errors.

Everything here is independent of the concrete schema: a schema is any pydantic model class.
User mistakes become `ConfigError` with a single line naming the file or the dotted key path;
scripts wrap their entry point in `exit_on_config_error()` to print it and exit with status 2.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.metadata
import platform
import re
import subprocess
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from framework.errors import ConfigError

BASE_KEY = "base"
VERSIONED_PACKAGES = ("framework", "jax", "jaxlib", "optax", "numpy", "pydantic")


# ----------------------------------------------------------------------------------------------
# YAML reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float and rejects duplicate keys (both silent traps)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        """Refuse a key written twice in one mapping, which YAML 1.1 would silently overwrite."""
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(ident)
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where a float needs a dot: `1e-3` would load as the string "1e-3".
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    """Parse YAML text into plain data (safe constructors only)."""
    return yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader subclass


def _yaml_problem(err: yaml.YAMLError) -> tuple[str, int | None, int | None]:
    """The problem text and 1-based line/column of a YAML error, where PyYAML knows them."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is None:
        return problem, None, None
    return problem, mark.line + 1, mark.column + 1


def _read_mapping(path: Path) -> dict:
    """Read one YAML file that must hold a mapping (an empty file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"{path}: cannot read ({reason})") from None
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as e:
        problem, line, col = _yaml_problem(e)
        where = f"{path}:{line}:{col}" if line is not None else f"{path}"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def deep_merge(parent: Mapping, child: Mapping) -> dict:
    """Child over parent: mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(dict(parent))
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_tree(path: str | Path) -> dict:
    """Read a YAML config and the `base:` files it inherits, merged into one plain tree."""
    return _load_with_bases(Path(path), ())


def _load_with_bases(path: Path, chain: tuple[Path, ...]) -> dict:
    """Resolve `base:` recursively; `chain` holds the files above this one to catch cycles."""
    try:
        ident = path.resolve()
    except OSError:
        ident = path.absolute()
    if ident in chain:
        names = " -> ".join(p.name for p in (*chain[chain.index(ident) :], ident))
        raise ConfigError(f"{path}: `{BASE_KEY}:` inheritance cycle: {names}")
    tree = _read_mapping(path)
    base = tree.pop(BASE_KEY, None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"{path}: `{BASE_KEY}:` must be a path to another YAML file, got {base!r}"
        )
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    parent = _load_with_bases(base_path, (*chain, ident))
    return deep_merge(parent, tree)


# ----------------------------------------------------------------------------------------------
# Overrides


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML: `3`, `1e-3`, `true`, `[1,2]`, `null` become data.
    A value starting with `*` (an unquoted glob such as `*.txt`, a YAML alias otherwise) is
    the string itself."""
    if text.strip().startswith("*"):
        return text.strip()
    return _parse_yaml(text)


def apply_overrides(tree: Mapping, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` strings in order to a copy of `tree`, creating sections as needed."""
    if isinstance(overrides, str):
        overrides = [overrides]
    out = copy.deepcopy(dict(tree))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.steps=100)")
        parts = key.split(".")
        if not key or any(not p.strip() for p in parts):
            raise ConfigError(f"override {item!r}: malformed key {key!r}")
        parts = [p.strip() for p in parts]
        try:
            value = parse_value(raw)
        except yaml.YAMLError as e:
            problem, _, _ = _yaml_problem(e)
            raise ConfigError(f"override {item!r}: cannot parse value: {problem}") from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: {prefix} is a value ({child!r}), not a section"
                )
            node = child
        node[parts[-1]] = value
    return out


# ----------------------------------------------------------------------------------------------
# Validation with one-line errors


def validate(schema_cls: type[pydantic.BaseModel], tree: Any) -> pydantic.BaseModel:
    """Validate a plain tree against the schema; the first error becomes a one-line ConfigError."""
    try:
        return schema_cls.model_validate(tree)
    except pydantic.ValidationError as e:
        errors = e.errors()
        if not errors:
            raise ConfigError(str(e)) from None
        raise ConfigError(format_error(schema_cls, errors[0])) from None


def load_config(
    schema_cls: type[pydantic.BaseModel], path: str | Path, overrides: Sequence[str] = ()
) -> pydantic.BaseModel:
    """Load a YAML file (with its bases), apply `key=value` overrides, validate into the schema."""
    return validate(schema_cls, apply_overrides(load_yaml_tree(path), list(overrides)))


_MESSAGE_PREFIXES = ("Value error, ", "Assertion failed, ")


def format_error(schema_cls: type[pydantic.BaseModel] | None, err: Mapping[str, Any]) -> str:
    """One line `dotted.key: problem` for one pydantic error dict, with a suggestion if unknown."""
    loc = tuple(err.get("loc", ()))
    path, fields = _walk_loc(schema_cls, loc)
    where = path or "(top level)"
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        return f"{where}: unknown key{_suggestion(key, fields)}"
    if kind == "missing":
        return f"{where}: required key is missing"
    msg = str(err.get("msg", "invalid value"))
    for prefix in _MESSAGE_PREFIXES:
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    got = err.get("input", None)
    if kind.startswith("union_tag") or isinstance(got, Mapping) or "input" not in err:
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {_short_repr(got)})"


def _short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to a readable length for an error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggestion(key: str, fields: Sequence[str] | None) -> str:
    """' (did you mean ...?)' for the closest valid key, else the valid keys when few."""
    if not fields:
        return ""
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    if len(fields) <= 12:
        return f" (valid keys: {', '.join(sorted(fields))})"
    return ""


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] wrappers and the None of Optional[...] from an annotation."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if _is_union(tp):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _is_union(tp: Any) -> bool:
    """Whether an annotation is a Union (typing.Union or the `A | B` form)."""
    origin = typing.get_origin(tp)
    return origin is typing.Union or origin is types.UnionType


def _is_model(tp: Any) -> bool:
    """Whether an annotation is a pydantic model class."""
    return isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def model_keys(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """Map every key a model accepts (field names and aliases) to its field info."""
    keys: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        keys[name] = info
        if info.alias:
            keys[info.alias] = info
    return keys


def literal_values(tp: Any) -> tuple:
    """The values of a Literal[...] annotation (unwrapped), or () for anything else."""
    tp = _unwrap(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()


def union_member_for_tag(union: Any, tag: Any, discriminator: str | None = None) -> Any:
    """The member of a union that pydantic names `tag` in an error location, or None."""
    members = [a for a in typing.get_args(union) if a is not type(None)]
    for member in members:  # explicit Tag("...") inside Annotated[...]
        if typing.get_origin(member) is typing.Annotated:
            for meta in typing.get_args(member)[1:]:
                if isinstance(meta, pydantic.Tag) and meta.tag == tag:
                    return _unwrap(member)
    candidates = [_unwrap(m) for m in members]
    names = [discriminator] if discriminator else []
    names += ["name"]
    for field in names:  # discriminated union: the member whose Literal field holds the tag
        for member in candidates:
            if _is_model(member) and field in member.model_fields:
                if tag in literal_values(member.model_fields[field].annotation):
                    return member
    for member in candidates:  # any Literal field holding the tag
        if _is_model(member):
            for info in member.model_fields.values():
                if tag in literal_values(info.annotation):
                    return member
    for member in candidates:  # smart (non-discriminated) union: tagged by type name
        if getattr(member, "__name__", None) == tag:
            return member
    return None


def _discriminator_of(info: Any) -> str | None:
    """The discriminator field name from a FieldInfo, when it is given as a plain string."""
    disc = getattr(info, "discriminator", None)
    return disc if isinstance(disc, str) else None


def _walk_loc(
    schema_cls: type[pydantic.BaseModel] | None, loc: tuple
) -> tuple[str, list[str] | None]:
    """Turn a pydantic error location into a dotted key path, and the valid keys at its end.

    Pydantic puts union tags (the discriminator value, or a member type's name) into `loc`;
    walking the schema alongside tells those apart from real keys, which go into the path.
    """
    parts: list[str] = []
    fields: list[str] | None = None
    tp: Any = schema_cls
    disc: str | None = None

    def add(element: Any) -> None:
        if isinstance(element, int) and parts:
            parts[-1] += f"[{element}]"
        elif isinstance(element, int):
            parts.append(f"[{element}]")
        else:
            parts.append(str(element))

    for element in loc:
        tp = _unwrap(tp) if tp is not None else None
        if tp is None or tp is Any:
            add(element)
            tp, fields = None, None
            continue
        origin = typing.get_origin(tp)
        if _is_model(tp):
            keys = model_keys(tp)
            fields = sorted(tp.model_fields)
            add(element)
            info = keys.get(element)
            tp = info.annotation if info is not None else None
            disc = _discriminator_of(info) if info is not None else None
        elif _is_union(tp):  # the element is a union tag, not a key: leave it out of the path
            tp = union_member_for_tag(tp, element, disc)
            disc = None
        elif origin in (list, tuple, set, frozenset) or (
            isinstance(origin, type)
            and issubclass(origin, Sequence)
            and not issubclass(origin, str)
        ):
            add(element)
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            if origin is tuple and isinstance(element, int) and len(args) > 1:
                tp = args[element] if element < len(args) else None
            else:
                tp = args[0] if args else None
            fields, disc = None, None
        elif origin is dict or (isinstance(origin, type) and issubclass(origin, Mapping)):
            add(element)
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else None
            fields, disc = None, None
        else:
            add(element)
            tp, fields, disc = None, None, None
    return ".".join(parts), fields


# ----------------------------------------------------------------------------------------------
# Scripts


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turn a config mistake into one `config error: ...` line on stderr and exit status 2.

    Works as `with exit_on_config_error(): ...` or as a decorator `@exit_on_config_error()`.
    """
    try:
        yield
    except (ConfigError, pydantic.ValidationError, FileNotFoundError, yaml.YAMLError) as e:
        _die(config_error_line(e))


def config_error_line(e: BaseException) -> str | None:
    """The one line for a config mistake (ConfigError, a pydantic error, a missing file,
    invalid YAML), or None for any other exception."""
    if isinstance(e, ConfigError):
        return f"config error: {e.message}"
    if isinstance(e, pydantic.ValidationError):
        errors = e.errors()
        return f"config error: {format_error(None, errors[0]) if errors else e}"
    if isinstance(e, FileNotFoundError):
        return f"error: {e.filename or e}: file not found"
    if isinstance(e, yaml.YAMLError):
        problem, line, col = _yaml_problem(e)
        where = f"line {line}:{col}: " if line is not None else ""
        return f"error: invalid YAML: {where}{problem}"
    return None


def _die(line: str) -> typing.NoReturn:
    """Print one line to stderr and exit with status 2 (a usage error)."""
    sys.stderr.write(" ".join(line.split()) + "\n")
    sys.stderr.flush()
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------
# Run directory record


def _git(*args: str) -> str | None:
    """Output of a git command in this file's repository, or None without git or a checkout."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def versions() -> dict[str, Any]:
    """Python, key package versions (missing ones skipped) and the git revision/dirty flag."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    revision = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    out["git_revision"] = (revision.strip() or None) if revision is not None else None
    out["git_dirty"] = bool(status.strip()) if status is not None else None
    return out


def dump_resolved(config: pydantic.BaseModel, run_dir: str | Path) -> Path:
    """Write the resolved config (`config.yaml`) and `versions.yaml` into the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    (run_dir / "versions.yaml").write_text(
        yaml.safe_dump(versions(), sort_keys=False), encoding="utf-8"
    )
    return path
