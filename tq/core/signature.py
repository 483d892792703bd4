"""Checking a task's arguments and result against its function's signature.

``Signature.of(fn, name)`` reads the parameters and annotations once (when a
task is declared, tq/tasks.py) and refuses what it cannot check; then
``payload`` turns call arguments into the map that is submitted, ``check`` and
``arguments`` check a map (at submit, and as a worker receives it), and
``check_result`` a return value. Every message names the field:
``argument 'tags[1]' must be str, got int 2``.

Checked annotations: str, int (not bool), float (an int is accepted), bool,
bytes, None, list, dict, list[X], dict[K, V], X | Y, Optional[X],
Literal[...], Any and none. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from tq.core.errors import ConfigError, InvalidRequest


class TaskArgumentError(InvalidRequest, TypeError):
    """Arguments (or a result) that do not fit the task's signature; names the field."""


class TaskDeclarationError(ConfigError, TypeError):
    """A task declaration tq cannot honour (bad option, unsupported annotation)."""


# -- annotation checks -----------------------------------------------------------------

_NAMES: dict[Any, str] = {
    str: "str",
    int: "int",
    float: "float",
    bool: "bool",
    bytes: "bytes",
    list: "list",
    dict: "dict",
}
_SUPPORTED = "str, int, float, bool, bytes, None, list, dict, list[X], dict[K, V], X | Y, Literal"


class Shape:
    """What a value must look like; ``problem`` says what is wrong, or None."""

    def __init__(
        self,
        text: str,
        accepts: Callable[[Any], bool],
        items: Shape | None = None,
        keys: Shape | None = None,
        options: tuple[Shape, ...] = (),
    ) -> None:
        self.text = text
        self.accepts = accepts
        self.items = items  # list elements, or dict values
        self.keys = keys  # dict keys
        self.options = options  # the members of a union

    def problem(self, value: Any, path: str) -> tuple[str, str] | None:
        """None if ``value`` fits, else (the path to the wrong part, what is wrong)."""
        if self.options:
            problems = [option.problem(value, path) for option in self.options]
            if any(p is None for p in problems):
                return None
            close = [p for o, p in zip(self.options, problems, strict=True) if o.accepts(value)]
            # one member has the value's outer type (a list for list[str] | None): say
            # what inside it is wrong rather than that the whole value is
            return close[0] if len(close) == 1 else (path, _mismatch(self.text, value))
        if not self.accepts(value):
            return path, _mismatch(self.text, value)
        if isinstance(value, dict):
            for key, item in value.items():
                if self.keys is not None and (p := self.keys.problem(key, path)):
                    return path, f"has key {key!r} that {p[1]}"
                if self.items is not None and (p := self.items.problem(item, f"{path}[{key!r}]")):
                    return p
        elif isinstance(value, list | tuple) and self.items is not None:
            for index, item in enumerate(value):
                if p := self.items.problem(item, f"{path}[{index}]"):
                    return p
        return None


def _mismatch(wanted: str, value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"must be {wanted}, got {type(value).__name__} {text}"


ANYTHING = Shape("anything", lambda v: True)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_NAMES_CHECK: dict[type, Callable[[Any], bool]] = {
    list: lambda v: isinstance(v, list | tuple),
    dict: lambda v: isinstance(v, dict),
}


def shape_of(annotation: Any, where: str) -> Shape:
    """The Shape for an annotation; TaskDeclarationError if tq cannot check it."""
    if annotation in (inspect.Parameter.empty, Any, object):
        return ANYTHING
    if annotation is None or annotation is type(None):
        return Shape("None", lambda v: v is None)
    if annotation is int:
        return Shape("int", _is_int)
    if annotation is float:
        return Shape("float", _is_number)
    if annotation in (str, bool, bytes, dict):
        return Shape(_NAMES[annotation], lambda v: isinstance(v, annotation))
    if annotation is list:
        return Shape("list", _NAMES_CHECK[list])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return shape_of(args[0], where)
    if origin in (typing.Union, types.UnionType):
        options = tuple(shape_of(arg, where) for arg in args)
        return Shape(" | ".join(o.text for o in options), ANYTHING.accepts, options=options)
    if origin is list and len(args) == 1:
        items = shape_of(args[0], where)
        return Shape(f"list[{items.text}]", _NAMES_CHECK[list], items=items)
    if origin is dict and len(args) == 2:
        keys, values = shape_of(args[0], where), shape_of(args[1], where)
        text = f"dict[{keys.text}, {values.text}]"
        return Shape(text, _NAMES_CHECK[dict], items=values, keys=keys)
    if origin is typing.Literal:
        allowed = tuple(args)
        text = " | ".join(repr(a) for a in allowed)
        return Shape(
            f"one of {text}" if len(allowed) > 1 else text,
            lambda v: any(type(v) is type(a) and v == a for a in allowed),
        )
    raise TaskDeclarationError(
        f"{where}: tq cannot check the annotation {annotation!r}; "
        f"use {_SUPPORTED}, Any or no annotation"
    )


@dataclasses.dataclass(frozen=True)
class Signature:
    """The function's parameters and result as Shapes, for checking payloads."""

    name: str
    signature: inspect.Signature
    params: dict[str, Shape]
    var_keyword: Shape | None  # the shape of **kwargs values, if the function takes them
    result: Shape

    @classmethod
    def of(cls, fn: Callable[..., Any], name: str) -> Signature:
        try:
            sig = inspect.signature(fn, eval_str=True)
        except (NameError, SyntaxError, TypeError) as exc:
            raise TaskDeclarationError(
                f"task {name}: cannot read the annotations of {fn.__qualname__} ({exc}); "
                "annotations must name types importable where the function is defined"
            ) from None
        params: dict[str, Shape] = {}
        var_keyword = None
        for param in sig.parameters.values():
            where = f"task {name}: parameter {param.name!r}"
            if param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL):
                raise TaskDeclarationError(
                    f"{where} is positional-only or *args: a task's payload is a map of "
                    "arguments by name, so every parameter needs a name"
                )
            if param.kind is param.VAR_KEYWORD:
                var_keyword = shape_of(param.annotation, where)
            else:
                params[param.name] = shape_of(param.annotation, where)
        result = shape_of(sig.return_annotation, f"task {name}: the return annotation")
        return cls(name, sig, params, var_keyword, result)

    def payload(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Arguments of a call, by name, checked: the payload to submit."""
        positional = [
            p.name for p in self.signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        if len(args) > len(positional):
            raise TaskArgumentError(
                f"{self.name}() takes {len(positional)} positional argument(s) "
                f"but {len(args)} were given"
            )
        payload = dict(zip(positional, args, strict=False))
        for key, value in kwargs.items():
            if key in payload:
                raise TaskArgumentError(f"{self.name}(): got multiple values for argument {key!r}")
            payload[key] = value
        self.check(payload)
        return payload

    def check(self, payload: Mapping[str, Any]) -> None:
        """Every argument known, present and of its annotated type; TaskArgumentError if not."""
        for key, value in payload.items():
            shape = self.params.get(key, self.var_keyword)
            if shape is None:
                raise TaskArgumentError(f"{self.name}(): unexpected argument {key!r}")
            if problem := shape.problem(value, key):
                path, what = problem
                raise TaskArgumentError(f"{self.name}(): argument '{path}' {what}")
        for key, param in self.signature.parameters.items():
            if key in self.params and param.default is param.empty and key not in payload:
                raise TaskArgumentError(f"{self.name}(): missing required argument {key!r}")

    def arguments(self, payload: Any) -> dict[str, Any]:
        """The keyword arguments for a run, from a payload as it came from the broker."""
        if payload is None:
            payload = {}
        if not isinstance(payload, dict) or not all(isinstance(k, str) for k in payload):
            raise TaskArgumentError(
                f"{self.name}(): the payload must be a map of arguments by name, "
                f"got {type(payload).__name__}"
            )
        self.check(payload)
        return payload

    def check_result(self, value: Any) -> Any:
        if problem := self.result.problem(value, "result"):
            path, what = problem
            raise TaskArgumentError(f"{self.name}(): {path} {what} (the return annotation)")
        return value
