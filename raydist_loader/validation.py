"""Layer 0 (base): pydantic validation errors as our one-line messages.

Every option, engine option and YAML config is a pydantic model; a bad value becomes one line that names the dotted
path of the key, what was received (never a value under a secret-bearing key) and what is expected; an unknown key
lists the known keys of its level; with the YAML document's node tree, each line also names the file's line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError

from .redact import redact_url

__all__ = ["format_validation_error", "field_range", "bounds_text"]


def format_validation_error(
    where: str, exc: ValidationError, model: type[BaseModel], root: yaml.Node | None = None
) -> str:
    """A pydantic error from validating ``model`` as our one-line message(s) with dotted paths, and the YAML line
    of each key when ``root`` (the composed YAML document) is given."""
    lines = [_format_one(where, root, err, model) for err in exc.errors(include_url=False)]
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems in {where}:\n  " + "\n  ".join(lines)


def _format_one(where: str, root: yaml.Node | None, err: Mapping[str, Any], model: type[BaseModel]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc) or "(top level)"
    line = _line_of(root, loc)
    prefix = f"{where}:{line}: " if line else f"{where}: "
    kind = err["type"]
    # a value under a secret-bearing key may be the secret itself (pasted into password_env by mistake)
    secret = any(part in ("password_env", "password_file", "options") for part in loc)
    received = "a value (not shown: it may be a secret)" if secret else _received(err.get("input"))
    if kind == "extra_forbidden":
        known = ", ".join(_known_keys(model, loc[:-1]))
        return f"{prefix}{dotted}: unknown key; known keys: {known}"
    if kind == "missing":
        return f"{prefix}{dotted}: required key is missing"
    msg = str(err["msg"])
    for head in ("Value error, ", "Assertion failed, "):
        if msg.startswith(head):
            msg = msg[len(head):]
    if msg.startswith("Input should be "):
        msg = "expected " + msg[len("Input should be "):]
    msg = msg.replace("expected greater than or equal to ", "expected a value >= ")
    msg = msg.replace("expected greater than ", "expected a value > ")
    msg = msg.replace("expected less than or equal to ", "expected a value <= ")
    msg = msg.replace("expected less than ", "expected a value < ")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        msg = f"expected a value in {field_range(model, loc) or msg[len('expected a value '):]}"
    return f"{prefix}{dotted}: got {received}; {msg}"


def field_range(model: type[BaseModel], loc: tuple[str, ...]) -> str | None:
    """The range a numeric field accepts, from its bounds, e.g. ``[1, 1024]`` or ``(0, 86400]``; None when the
    path does not lead to a bounded field."""
    field = None
    for i, part in enumerate(loc):
        field = model.model_fields.get(part)
        if field is None:
            return None
        if i < len(loc) - 1:
            nested = [t for t in (field.annotation, *get_args(field.annotation)) if _is_model(t)]
            if not nested:
                return None
            model = nested[0]
    return bounds_text(field.metadata) if field is not None else None


def bounds_text(metadata: Sequence[Any]) -> str | None:
    """``[low, high]`` (``(`` / ``)`` for strict bounds) from a field's annotated-types metadata; None unless it
    has both a lower and an upper bound."""
    low = high = None
    for rule in metadata:
        if isinstance(rule, annotated_types.Ge):
            low = f"[{rule.ge:g}"
        elif isinstance(rule, annotated_types.Gt):
            low = f"({rule.gt:g}"
        elif isinstance(rule, annotated_types.Le):
            high = f"{rule.le:g}]"
        elif isinstance(rule, annotated_types.Lt):
            high = f"{rule.lt:g})"
    return f"{low}, {high}" if low and high else None


def _received(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(redact_url(value)) if "://" in value else repr(value)
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, bool) else str(value).lower()


def _known_keys(model: type[BaseModel], parent: tuple[str, ...]) -> list[str]:
    """The keys the model at ``parent`` (a path of field names from ``model``) accepts."""
    for part in parent:
        field = model.model_fields.get(part)
        nested = [t for t in (field.annotation, *get_args(field.annotation)) if _is_model(t)] if field else []
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _line_of(root: yaml.Node | None, loc: tuple[str, ...]) -> int | None:
    """1-based line of the key at ``loc`` in the YAML, or of its nearest existing parent."""
    node, line = root, None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                line = key.start_mark.line + 1
                node = value
                break
        else:
            break
    return line
