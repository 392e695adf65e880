"""Make values from outside safe to store on both dialects without losing the rest of a batch.

PostgreSQL rejects NUL characters in text and JSONB, strings that are not valid UTF-8 (a Python
``str`` holding lone surrogates, e.g. from ``errors="surrogateescape"``), NaN/Infinity inside JSON,
and text longer than a ``VARCHAR(n)``. Instead of failing the whole transaction we escape such
characters visibly (``\\u0000``, ``\\udcff``), turn non-finite floats in JSON into strings and
truncate long text with a marker saying how much was cut.
"""

from __future__ import annotations

import json
import math
from datetime import date, datetime
from typing import Any

_MAX_DEPTH = 64


def clean_text(value: Any, limit: int | None = None) -> str:
    """``value`` as a string PostgreSQL accepts, at most ``limit`` characters long."""
    s = value if isinstance(value, str) else _to_text(value)
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
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
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
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
        return clean_text(value)
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


def dumps(value: Any) -> str:
    """The JSON text stored for a column (already cleaned values only)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def clean_float(value: Any) -> float | None:
    return None if value is None else float(value)
