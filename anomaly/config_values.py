"""Typed config values from YAML and the environment: strict coercion with one-line errors.

``coerce(where, hint, value)`` turns what YAML or an ``ANOMALY_*`` variable gave into the type a
config dataclass declares (``anomaly.config``), or raises a ``ConfigError`` that names the field
(``where``) and never echoes a text value, which may be a password.
"""

from __future__ import annotations

import contextlib
import math
import re
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from anomaly.errors import ConfigError

# Text a boolean field accepts (case-insensitive), from the environment or quoted in the file.
_BOOLS = {"true": True, "yes": True, "on": True, "1": True}
_BOOLS |= {"false": False, "no": False, "off": False, "0": False}
_INT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*")


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "a list", dict: "a mapping"}.get(
        type(value), type(value).__name__
    )


def shown(value: Any) -> str:
    """A bad value in an error message: a short scalar as written, anything else by its kind."""
    if isinstance(value, str | int | float) and len(repr(value)) <= 40:
        return repr(value)
    return kind_of(value)


def optional_type(hint: Any) -> tuple[Any, bool]:
    """``X | None`` as ``(X, True)``; any other type as ``(type, False)``."""
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        rest = [a for a in get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def coerce(where: str, hint: Any, value: Any) -> Any:
    """``value`` as the declared type ``hint``, or a ConfigError naming ``where``.

    Strings reach number and boolean fields from the environment (and from quoted YAML) and are
    parsed strictly. Text fields never take a number or a boolean: YAML has already mangled it
    (``0123`` is 83, ``12:30`` is 750, ``no`` is False) and what the user meant is lost.
    """
    hint, optional = optional_type(hint)
    if value is None and optional:
        return None
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        choices = " or ".join(repr(a) for a in args)
        raise ConfigError(f"{where}: expected {choices}, got {shown(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {kind_of(value)}")
        return [coerce(f"{where}[{i}]", args[0], item) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {kind_of(value)}")
        return {
            coerce(f"{where} key", args[0], k): coerce(f"{where}.{k}", args[1], v)
            for k, v in value.items()
        }
    if hint is str:
        if isinstance(value, str):
            return value
        # Not the value itself: a text field may be a password.
        raise ConfigError(f"{where}: expected a string, got {kind_of(value)} (quote it in YAML)")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str | int) and str(value).strip().lower() in _BOOLS:
            return _BOOLS[str(value).strip().lower()]
        raise ConfigError(f"{where}: expected true or false, got {shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {shown(value)}")
    if hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where}: expected a number, got {shown(value)}")
        return number
    raise TypeError(f"{where}: no conversion for the declared type {hint!r}")  # a new field type


def value_from_env(var: str, hint: Any, text: str) -> Any:
    """A variable's text as the value the YAML file would hold; scalars stay text for coerce."""
    base, optional = optional_type(hint)
    if optional and text == "":
        return None
    if get_origin(base) in (list, dict):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            # Not the text itself: kafka.settings may carry a password.
            raise ConfigError(f"{var}: not valid YAML or JSON") from None
    return text
