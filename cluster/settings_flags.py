"""Command-line flags generated from the settings' own declarations, so a setting is declared once.

    add_setting_flags(parser, setting_fields(EngineConfig))           # --max-model-len, --block-size, ...
    set_flags(args, setting_fields(EngineConfig))  -> {"max_model_len": 4096}   (the flags given)

A field `max_model_len` becomes `--max-model-len`, typed by its annotation (int, float, str, a Literal's choices,
`--x / --no-x` for a bool, values that add up for a list, a JSON object for a dict), with its description and
default as help. Every flag defaults to None, "not given", so what the config file or the engine says holds.
Fields come from a pydantic model (`setting_fields`) or a dataclass (`dataclass_setting_fields`, whose
`metadata["help"]` is the description).

Light on purpose: it imports neither pydantic nor anything of the engine, so `herd --help` stays quick.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any, Iterable, Literal, NamedTuple, Union


class SettingField(NamedTuple):
    name: str
    annotation: Any
    default: Any            # None when the field has no plain default (a factory, or required)
    description: str


def setting_fields(model: Any, names: Iterable[str] | None = None) -> list[SettingField]:
    """The fields of a pydantic model (all, or those named, in that order)."""
    fields = model.model_fields
    out = []
    for name in (names if names is not None else fields):
        f = fields[name]
        default = None if f.default_factory is not None or f.is_required() else f.default
        out.append(SettingField(name, f.annotation, default, f.description or ""))
    return out


def dataclass_setting_fields(cls: Any, names: Iterable[str] | None = None) -> list[SettingField]:
    """The fields of a dataclass; a field's description is its `metadata["help"]`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    namespace = vars(sys.modules[cls.__module__])
    out = []
    for name in (names if names is not None else fields):
        f = fields[name]
        # Only the fields asked for are resolved: another may name a type its module imports lazily.
        annotation = eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307 - own source
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(SettingField(name, annotation, default, f.metadata.get("help", "")))
    return out


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser | Any, fields: Iterable[SettingField], *,
                      help_prefix: str = "", show_default: bool = True) -> None:
    """One flag per field (see the module doc); `help_prefix` starts each help text."""
    for f in fields:
        text = help_prefix + f.description
        if show_default and f.default is not None and f.default != [] and f.default != {}:
            text += f" (default: {f.default})"
        parser.add_argument(flag_name(f.name), dest=f.name, default=None, help=text.replace("%", "%%"),
                            **_argparse_kind(f.annotation))


def set_flags(args: argparse.Namespace, fields: Iterable[SettingField]) -> dict[str, Any]:
    """{field name: value} of the flags given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name, None) is not None}


def _argparse_kind(annotation: Any) -> dict[str, Any]:
    """add_argument keywords (type, choices, nargs, action) for a field's annotation."""
    base = _strip(annotation)
    origin = typing.get_origin(base)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = typing.get_args(base)
        return {"choices": choices, "type": type(choices[0])}
    if origin in (list, tuple):
        item = _strip(typing.get_args(base)[0]) if typing.get_args(base) else str
        # extend: `--stop a b` and `--stop a --stop b` both give [a, b]
        return {"action": "extend", "nargs": "+", "type": item, "metavar": item.__name__.upper()}
    if origin is dict or base is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if base in (int, float, str):
        return {"type": base}
    raise TypeError(f"no command-line form for a setting of type {annotation!r}")


def _strip(annotation: Any) -> Any:
    """The annotation without Optional[...] and Annotated[...] wrappers."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                raise TypeError(f"no command-line form for a union {annotation!r}")
            annotation = rest[0]
        else:
            return annotation


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"CPU\": 1}}', got {text!r}")
    return value
