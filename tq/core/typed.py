"""msgspec's validation errors in tq's words: the field, the rule, the value sent.

``explain`` reads the rule from the declaration (``msgspec.inspect``), so a
limit written once in a Struct's ``Meta`` is also the limit every error
message states. Pure: imports msgspec only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from msgspec import Meta, inspect

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[('(?:[^'\\]|\\.)*'|\"[^\"]*\")\]")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]+)`")


def explain(exc: Exception, struct: type, obj: Any, *, what: str | None = None) -> str:
    """msgspec's error about ``obj`` (the plain data) decoded as ``struct``, in tq's
    words: the request, the field, the rule from the declaration, the value sent.

    ``what`` names a lone value (``"task"``: "task max_retries must be ..."); without
    it the struct is a request ("claim message: field 'n' must be ..."). A field of
    a request that holds task specs (``submit``'s ``tasks``) is named like a lone
    task, with its index: "task 3: task queue must be ...; nothing was submitted"."""
    match = _AT.match(str(exc))
    assert match is not None
    core, path = match.group("what"), _segments(match.group("path") or "")
    missing = _MISSING.match(core)
    unknown = _UNKNOWN.match(core)
    if missing or unknown:
        path = [*path, (missing or unknown).group(1)]  # type: ignore[union-attr]
    if what is None and len(path) >= 3 and path[0] == "tasks" and isinstance(path[1], int):
        task = _value_at(obj, path[:2])
        text = _say(core, path[2:], bool(missing), bool(unknown), TASK_SPEC_STRUCT[0], task, "task")
        return f"task {path[1]}: {text}; nothing was submitted"
    nested = _task_field(struct, path)
    if nested is not None:  # a request's one task (a schedule's): named like a lone task
        task = _value_at(obj, path[:1])
        text = _say(core, path[1:], bool(missing), bool(unknown), nested, task, "task")
        tag = struct.__struct_config__.tag  # type: ignore[attr-defined]
        where = f"{tag} message: field '{path[0]}'" if what is None else f"{what} {path[0]}"
        return f"{where}: {text}"
    return _say(core, path, bool(missing), bool(unknown), struct, obj, what)


def _task_field(struct: type, path: list[str | int]) -> type | None:
    """The task declaration (``TASK_SPEC_STRUCT``) a request's field ``path[0]`` holds,
    when the error is inside it."""
    if len(path) < 2 or not isinstance(path[0], str):
        return None
    info = _strip(_field_info(struct, path[:1]))
    if isinstance(info, inspect.StructType) and info.cls in TASK_SPEC_STRUCT:
        return info.cls
    return None


def _say(
    core: str,
    path: list[str | int],
    missing: bool,
    unknown: bool,
    struct: type,
    obj: Any,
    what: str | None,
) -> str:
    info = _field_info(struct, path) if path else None
    value = _value_at(obj, path)
    if what is not None:
        if not path:
            return f"a {what} must be a map, got {type_name(obj)}" if obj is not None else core
        where = f"{what} " + _join(path)
    else:
        kind = f"{struct.__struct_config__.tag} message"  # type: ignore[attr-defined]
        if not path:
            return f"{kind}: {core}"
        where = f"{kind}: field '{path[0]}'" + _join(path[1:], first=False)
    if unknown:
        known = sorted(getattr(struct, "__struct_fields__", ()))
        noun = f"{what} field" if what else "field"
        return f"unknown {noun} {_join(path) if what else where}; known: {', '.join(known)}"
    rule = rule_of(info) if info is not None else core
    if missing or value is None:
        return f"{where} must be {rule}; it is required (nil or missing)"
    return f"{where} must be {rule}, got {describe(value)}"


# the task declarations, submit's first (set by tq.core.task, which imports this module)
TASK_SPEC_STRUCT: list[type] = []


def _join(path: list[str | int], first: bool = True) -> str:
    out = ""
    for n, seg in enumerate(path):
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            out += seg if first and n == 0 else f".{seg}"
    return out


def _segments(path: str) -> list[str | int]:
    out: list[str | int] = []
    for name, index, key in _SEGMENT.findall(path):
        out.append(name or (int(index) if index else key[1:-1]))
    return out


def _value_at(obj: Any, path: list[str | int]) -> Any:
    for seg in path:
        if isinstance(seg, int) and isinstance(obj, list | tuple) and seg < len(obj):
            obj = obj[seg]
        elif isinstance(obj, Mapping):
            obj = obj.get(seg)
        else:
            return None
    return obj


def _field_info(struct: type, path: list[str | int]) -> Any:
    info: Any = inspect.type_info(struct)
    for seg in path:
        info = _strip(info)
        if isinstance(seg, int):
            if isinstance(info, inspect.ListType | inspect.SetType | inspect.VarTupleType):
                info = info.item_type
            elif isinstance(info, inspect.TupleType) and seg < len(info.item_types):
                info = info.item_types[seg]
            else:
                return None
        elif isinstance(info, inspect.StructType):
            field = next((f for f in info.fields if f.encode_name == seg), None)
            if field is None:
                return None
            info = field.type
        elif isinstance(info, inspect.DictType):
            info = info.value_type
        else:
            return None
    return info


def _strip(info: Any) -> Any:
    """The type without nil (nil equals absent) and without its Metadata wrapper."""
    if isinstance(info, inspect.UnionType):
        types = [t for t in info.types if not isinstance(t, inspect.NoneType)]
        if len(types) == 1:
            return _strip(types[0])
    if isinstance(info, inspect.Metadata):
        return _strip(info.type)
    return info


def _bounds(lo: Any, hi: Any, unit: str = "") -> str:
    def show(x: Any) -> str:
        if isinstance(x, float):
            return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:g}"
        if isinstance(x, int) and x >= 2**31:
            return f"2^{x.bit_length()}-1" if x == 2 ** x.bit_length() - 1 else str(x)
        return str(x)

    if lo is not None and hi is not None:
        return f" {show(lo)}..{show(hi)}{unit}"
    if lo is not None:
        return f" >= {show(lo)}{unit}"
    if hi is not None:
        return f" <= {show(hi)}{unit}"
    return ""


def rule_of(info: Any) -> str:
    """What a value of this declared type must be, in words."""
    if isinstance(info, inspect.UnionType):
        parts = [t for t in info.types if not isinstance(t, inspect.NoneType)]
        if len(parts) == 1:
            return rule_of(parts[0])
        return " or ".join(rule_of(t) for t in parts)
    if isinstance(info, inspect.Metadata):
        extra = info.extra or {}
        if "rule" in extra:
            return str(extra["rule"])
        return rule_of(info.type)
    if isinstance(info, inspect.IntType):
        return "an integer" + _bounds(info.ge, info.le)
    if isinstance(info, inspect.FloatType):
        return "a finite number" + _bounds(info.ge, info.le)
    if isinstance(info, inspect.StrType):
        if info.pattern is not None:
            return "a string matching " + info.pattern
        if info.min_length == 1 and info.max_length is None:
            return "a non-empty string"
        if info.min_length or info.max_length is not None:
            return "a string of" + _bounds(info.min_length or 0, info.max_length, " characters")
        return "a string"
    if isinstance(info, inspect.BoolType):
        return "a bool"
    if isinstance(info, inspect.LiteralType):
        return "one of " + ", ".join(str(v) for v in info.values)
    if isinstance(info, inspect.ListType | inspect.VarTupleType):
        bounds = ""
        if info.min_length or info.max_length is not None:
            bounds = f" ({_bounds(info.min_length or 0, info.max_length).strip()} items)"
        return f"an array of {_plural(rule_of(info.item_type))}{bounds}"
    if isinstance(info, inspect.TupleType):
        return "an array [" + ", ".join(rule_of(t) for t in info.item_types) + "]"
    if isinstance(info, inspect.DictType | inspect.StructType):
        return "a map"
    if isinstance(info, inspect.AnyType):
        return "any value"
    return type(info).__name__


_NOUN = re.compile(r"\b(string|integer|number|map|bool|array)\b")


def _plural(rule: str) -> str:
    """ "a string" -> "strings", "an integer 0..9" -> "integers 0..9"."""
    for article in ("an ", "a "):
        if rule.startswith(article):
            return _NOUN.sub(r"\1s", rule[len(article) :], count=1)
    return rule


def type_name(value: object) -> str:
    """The msgpack name of a decoded value's type, for error messages."""
    names = {bool: "bool", int: "int", float: "float", str: "str", bytes: "bin"}
    names.update({list: "array", tuple: "array", dict: "map", type(None): "nil"})
    return names.get(type(value), type(value).__name__)


def describe(value: object) -> str:
    """A short account of a value sent: its type, and the value for a scalar."""
    kind = type_name(value)
    if isinstance(value, bool | int | float):
        return f"{kind} {value!r}"
    if isinstance(value, str):
        return f"{kind} {value[:60]!r}" + ("..." if len(value) > 60 else "")
    return kind


def doc(
    text: str,
    *,
    default: str | None = None,
    req: str | None = None,
    required_for: tuple[str, ...] = (),
    bounds: str | None = None,
) -> Meta:
    """A field's description, as a ``msgspec.Meta`` to put in its ``Annotated``: the
    meaning column of docs/PROTOCOL.md and the OpenAPI description (both generated,
    tq.protocol.docgen). ``default`` is the default column's text (what the service
    does when the field is absent); ``required_for`` names the kinds of request
    (``op``/``q``) that need an optional field; ``req`` replaces the req column's text;
    ``bounds`` replaces the ranges read from the declaration ("" for none)."""
    extra: dict[str, Any] = {}
    if default is not None:
        extra["default"] = default
    if req is not None:
        extra["req"] = req
    if required_for:
        extra["required_for"] = required_for
    if bounds is not None:
        extra["bounds"] = bounds
    return Meta(description=text, extra=extra or None)
