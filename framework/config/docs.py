"""Generate a markdown config reference from a schema, so the docs cannot drift from the code.

One table per section (dotted key, type, default, description); a discriminated union of
model configs (for instance `model:` chosen by `name`) gets one sub-table per variant.

    python -m framework.config.docs framework.train.config:Config -o docs/config.md
"""

from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import json
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic

from framework.config.loader import _is_model, _is_union, _unwrap, literal_values

_CONSTRAINTS = (
    ("gt", ">"),
    ("ge", ">="),
    ("lt", "<"),
    ("le", "<="),
    ("multiple_of", "multiple of"),
    ("min_length", "min length"),
    ("max_length", "max length"),
    ("pattern", "matches"),
)


def type_name(tp: Any) -> str:
    """A short readable name for an annotation: `int`, `"a" | "b"`, `list[int] | null`."""
    if tp is None or tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if tp is Ellipsis:
        return "..."
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(_value_text(v) for v in args)
    if _is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _value_text(value: Any) -> str:
    """A default or literal value written as it would appear in YAML/JSON."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, pydantic.BaseModel):
        value = value.model_dump(mode="json")
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _constraints(info: Any) -> str:
    """Numeric/length constraints from a field's metadata, e.g. `> 0, <= 1`."""
    found = []
    for meta in getattr(info, "metadata", ()):
        for attr, symbol in _CONSTRAINTS:
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{symbol} {_value_text(value)}")
    return ", ".join(found)


def _default_text(info: Any) -> str:
    """The default of a field as text: a value, `required`, or a note for sections."""
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        takes_data = getattr(info, "default_factory_takes_data", False)
        if takes_data:
            return "(computed)"
        try:
            value = info.default_factory()
        except Exception:  # a factory that needs context: do not guess
            return "(computed)"
    else:
        value = info.default
    if isinstance(value, pydantic.BaseModel):
        return "(section defaults)"
    return _value_text(value)


def _union_default(info: Any, disc: str | None) -> str:
    """The default of a union-of-models field, naming the default variant: `(name: "mlp")`."""
    text = _default_text(info)
    if text != "(section defaults)":
        return text
    value = info.default if info.default_factory is None else info.default_factory()
    return f"({_variant_tag(type(value), disc)} defaults)"


def _cell(text: str) -> str:
    """Make text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _doc_line(model: type) -> str:
    """First line of a model's own docstring (not an inherited one), or ''."""
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc).splitlines()[0] if doc else ""


def _nullable(tp: Any) -> bool:
    """Whether an annotation admits None (Optional[...] / `X | None`)."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _union_models(tp: Any) -> list[type[pydantic.BaseModel]] | None:
    """The model members of a union of two or more models (None when not such a union)."""
    if not _is_union(tp):
        return None
    members = [_unwrap(a) for a in typing.get_args(tp) if a is not type(None)]
    models = [m for m in members if _is_model(m)]
    return models if len(models) >= 2 else None


def _discriminator_field(
    variants: Sequence[type[pydantic.BaseModel]], hint: str | None
) -> str | None:
    """The field that picks a variant: the declared one, else a Literal field all variants share."""
    if hint:
        return hint
    shared = [
        name
        for name in variants[0].model_fields
        if all(
            name in v.model_fields and literal_values(v.model_fields[name].annotation)
            for v in variants
        )
    ]
    return "name" if "name" in shared else (shared[0] if shared else None)


def _variant_tag(model: type[pydantic.BaseModel], field: str | None) -> str:
    """How a union variant is chosen: `name: "gpt"`, or the class name when there is no tag."""
    if field and field in model.model_fields:
        values = literal_values(model.model_fields[field].annotation)
        if values:
            return f"{field}: " + " | ".join(_value_text(v) for v in values)
    return model.__name__


def _container_item(tp: Any) -> tuple[str, Any] | None:
    """For list[X]/dict[str, X]: the key suffix (`[]` or `.<key>`) and X; else None."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, tuple, set, frozenset) or (
        isinstance(origin, type) and issubclass(origin, Sequence) and not issubclass(origin, str)
    ):
        items = [a for a in args if a is not Ellipsis]
        return ("[]", items[0]) if len(items) == 1 else None
    if origin is dict or (isinstance(origin, type) and issubclass(origin, Mapping)):
        return (".<key>", args[1]) if len(args) == 2 else None
    return None


class _Writer:
    """Accumulates markdown: a section table per model, sub-sections after each table."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(
        self,
        model: type[pydantic.BaseModel],
        prefix: str,
        depth: int,
        heading: str,
        note: str = "",
        seen: tuple[type, ...] = (),
    ) -> None:
        """Emit one model's table, then recurse into its nested sections."""
        level = "#" * min(depth + 2, 6)
        self.lines += [f"{level} {heading}", ""]
        for text in (note, _doc_line(model)):
            if text:
                self.lines += [text, ""]
        if model in seen:  # a recursive schema: do not expand forever
            self.lines += ["(recursive: see above)", ""]
            return
        seen = (*seen, model)
        rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
        children: list[tuple] = []
        for name, info in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            inner = _unwrap(info.annotation)
            kind = type_name(info.annotation)
            default_text = _default_text(info)
            constraints = _constraints(info)
            if constraints:
                kind = f"{kind} ({constraints})"
            if _is_model(inner):
                kind = "section or null" if _nullable(info.annotation) else "section"
                children.append(("model", key, inner, info))
            elif (variants := _union_models(inner)) is not None:
                hint = info.discriminator if isinstance(info.discriminator, str) else None
                disc = _discriminator_field(variants, hint)
                kind = "one of: " + ", ".join(_variant_tag(v, disc) for v in variants)
                default_text = _union_default(info, disc)
                children.append(("union", key, variants, info, disc))
            elif (item := _container_item(inner)) is not None:
                suffix, item_tp = item
                item_tp = _unwrap(item_tp)
                if _is_model(item_tp):
                    children.append(("model", key + suffix, item_tp, info))
                elif (variants := _union_models(item_tp)) is not None:
                    disc = _discriminator_field(variants, None)
                    children.append(("union", key + suffix, variants, info, disc))
            desc = info.description or ""
            rows.append(
                f"| `{_cell(key)}` | {_cell(kind)} | {_cell(default_text)} | {_cell(desc)} |"
            )
        self.lines += [*rows, ""]
        self._children(children, depth, seen)

    def _children(self, children: list[tuple], depth: int, seen: tuple[type, ...]) -> None:
        """Emit the nested sections found in one table: a model, or each variant of a union."""
        for child in children:
            if child[0] == "model":
                _, key, sub, info = child
                self.section(sub, key, depth + 1, f"`{key}`", info.description or "", seen)
            else:
                _, key, variants, info, disc = child
                self.lines += [f"{'#' * min(depth + 3, 6)} `{key}`", ""]
                if info.description:
                    self.lines += [info.description, ""]
                how = f"chosen by `{key}.{disc}`" if disc else "told apart by their keys"
                self.lines += [f"One of {len(variants)} variants, {how}.", ""]
                for variant in variants:
                    self.section(
                        variant,
                        key,
                        depth + 2,
                        f"`{key}` ({_cell(_variant_tag(variant, disc))})",
                        "",
                        seen,
                    )


def reference_markdown(schema_cls: type[pydantic.BaseModel], title: str | None = None) -> str:
    """A markdown reference of every config key (dotted), its type, default and description."""
    writer = _Writer()
    writer.lines += [
        f"# {title or 'Configuration reference'}",
        "",
        f"Generated from `{schema_cls.__module__}.{schema_cls.__qualname__}` by "
        "`python -m framework.config.docs`; do not edit by hand.",
        "",
    ]
    writer.section(schema_cls, "", 0, "Top level")
    return "\n".join(writer.lines).rstrip() + "\n"


def write_reference(schema_cls: type[pydantic.BaseModel], path: str | Path) -> Path:
    """Write the markdown reference for a schema to `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reference_markdown(schema_cls), encoding="utf-8")
    return path


def _import_schema(spec: str) -> type[pydantic.BaseModel]:
    """Import `package.module:ClassName` and check it is a pydantic model class."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise SystemExit(f"error: expected module:Class, got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not _is_model(obj):
        raise SystemExit(f"error: {spec} is not a pydantic model class")
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print or write the reference for the schema named `module:Class`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schema", help="the schema class, as module:Class")
    parser.add_argument("-o", "--output", help="markdown file to write (default: stdout)")
    args = parser.parse_args(argv)
    schema_cls = _import_schema(args.schema)
    if args.output:
        print(write_reference(schema_cls, args.output))
    else:
        sys.stdout.write(reference_markdown(schema_cls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
