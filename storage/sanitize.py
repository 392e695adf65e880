"""Make values from outside safe to store on both dialects without losing the rest of a batch.

PostgreSQL rejects NUL characters in text and JSONB, strings that are not valid UTF-8 (a Python
``str`` holding lone surrogates, e.g. from ``errors="surrogateescape"``), NaN/Infinity inside JSON,
and text longer than a ``VARCHAR(n)``. Instead of failing the whole transaction we escape such
characters visibly (``\\u0000``, ``\\udcff``), write non-finite floats in JSON as null and bytes
inside JSON as base64, and truncate long text with a marker saying how much was cut. (Bytes
columns, such as a dead letter's raw value, are stored unchanged.)
"""

from __future__ import annotations

import base64
import json
import math
from datetime import date, datetime
from typing import Any

import msgspec

_MAX_DEPTH = 64


def clean_text(value: Any, limit: int | None = None) -> str:
    """``value`` as a string PostgreSQL accepts, at most ``limit`` characters long."""
    s = value if isinstance(value, str) else _to_text(value)
    # ASCII needs no UTF-8 check: saves ~0.035 us a call, ~0.18 us per alert (five texts;
    # bench/storage_rows.py, "clean_text"), ~2-3% of the client CPU per alert.
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in s:
        s = s.replace("\x00", "\\u0000")
    if limit is not None and len(s) > limit:
        marker = f"...[truncated {len(s)} chars]"
        s = s[: max(0, limit - len(marker))] + marker
    return s


def _to_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def clean_json(value: Any, _depth: int = 0) -> Any:
    """A JSON-serializable copy of ``value`` that PostgreSQL's JSONB accepts."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no NaN/Infinity
    if isinstance(value, str):
        return clean_text(value)
    if _depth >= _MAX_DEPTH:
        return clean_text(repr(value), 10_000)
    if isinstance(value, dict):
        return {clean_text(k): clean_json(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [clean_json(v, _depth + 1) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    # numpy scalars and arrays, Decimal, ...: their Python value, else their text.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return clean_json(tolist(), _depth + 1)
    item = getattr(value, "item", None)
    if callable(item):
        return clean_json(item(), _depth + 1)
    if isinstance(value, int | float):  # e.g. Decimal subclasses registered as numbers
        return clean_json(float(value), _depth + 1)
    return clean_text(str(value))


class JSONText(str):
    """JSON already serialized (and known to be clean): stored as is, not serialized again."""

    __slots__ = ()


_msgspec_encode = msgspec.json.Encoder().encode
_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def dumps(value: Any) -> str:
    """The engine's JSON serializer: ``JSONText`` passes through, anything else is encoded."""
    if type(value) is JSONText:
        return str(value)
    return _ENCODE(value)


def json_bytes(value: Any) -> bytes:
    """``value`` as UTF-8 JSON that PostgreSQL accepts (``json`` and ``jsonb``).

    The fast path encodes once with msgspec (C) and checks the result: UTF-8 output without NUL
    escapes needs no cleaning (msgspec already writes NaN/Infinity as null and bytes as base64,
    as ``clean_json`` does). Anything else (lone surrogates, NULs, numpy values, unknown types)
    takes the slow path through ``clean_json``. The fast path saves ~18 us per alert (the three
    JSON columns: 2.1 instead of 20.4 us; bench/storage_rows.py). ``JSONText`` is already
    such JSON and passes through."""
    if type(value) is JSONText:
        return value.encode("utf-8")
    try:
        data = _msgspec_encode(value)
    except (TypeError, ValueError, NotImplementedError, OverflowError):
        # UnicodeEncodeError (lone surrogates) is a ValueError; unknown types raise TypeError.
        return _ENCODE(clean_json(value)).encode("utf-8")
    if b"\\u0000" in data:
        return _ENCODE(clean_json(value)).encode("utf-8")
    return data


def json_text(value: Any) -> JSONText:
    """``value`` as JSON text PostgreSQL accepts (see ``json_bytes``), for the JSON serializer
    of the engine (``dumps``)."""
    if type(value) is JSONText:
        return value
    return JSONText(json_bytes(value).decode("utf-8"))


def clean_float(value: Any) -> float | None:
    return None if value is None else float(value)
