"""Expand Grafana's SQL macros and template variables the way Grafana's PostgreSQL datasource
does, so a panel's query can be run outside Grafana (tests, ``anomaly dashboards check``).

Covered: ``$__timeFilter(col)``, ``$__timeFrom()``, ``$__timeTo()``, ``$__timeGroup(col, iv)``,
``$__timeGroupAlias(col, iv)``, ``$__interval``, ``$__interval_ms`` and ``$name`` / ``${name}`` /
``${name:sqlstring}`` variables; variables are interpolated first, then macros. As in Grafana:

- ``${name:sqlstring}`` quotes each value with single quotes, doubling the quotes inside, and joins
  the values with commas (``a'b`` -> ``'a''b'``; ``[x, y]`` -> ``'x','y'``);
- a bare ``$name`` of a multi-value or include-all variable (a list here) becomes the same list;
- a bare ``$name`` of a single-value variable (a string here) is inserted as is. (Recent Grafana
  versions double its quotes, older ones do not; neither adds any, so SQL must use sqlstring.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_MACRO = re.compile(r"\$__(\w+)\(([^()]*)\)")
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")


class MacroError(ValueError):
    pass


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    interval_s: float = 60.0  # what Grafana picks for $__interval from the range and panel width


def format_interval(seconds: float) -> str:
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"


def parse_interval(text: str) -> float:
    m = re.fullmatch(r"\s*'?(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)'?\s*", text)
    if not m:
        raise MacroError(f"cannot parse interval {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def interpolate(sql: str, variables: Mapping[str, str | Sequence[str]]) -> str:
    """Replace ``$name``/``${name}``/``${name:sqlstring}``; a list is a multi-value variable."""

    def sub(m: re.Match[str]) -> str:
        name, fmt = m.group(1) or m.group(3), m.group(2)
        if name.startswith("__"):
            return m.group(0)  # a macro or built-in, handled later
        if name not in variables:
            raise MacroError(f"query uses ${name}, which has no value")
        value = variables[name]
        if not isinstance(value, str) and not value:
            raise MacroError(f"multi-value variable ${name} has no values")
        if fmt not in (None, "sqlstring"):
            raise MacroError(f"unsupported variable format ${{{name}:{fmt}}}")
        if fmt is None and isinstance(value, str):
            return value  # unquoted, as Grafana does for a single-value variable
        return ",".join(_quote(v) for v in ([value] if isinstance(value, str) else value))

    return _VARIABLE.sub(sub, sql)


def expand(
    sql: str, time_range: TimeRange, variables: Mapping[str, str | Sequence[str]] | None = None
) -> str:
    sql = interpolate(sql, variables or {})
    sql = sql.replace("$__interval_ms", str(int(time_range.interval_s * 1000)))
    sql = sql.replace("$__interval", format_interval(time_range.interval_s))
    start, end = _rfc3339(time_range.start), _rfc3339(time_range.end)

    def sub(m: re.Match[str]) -> str:
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",") if a.strip()]
        if name == "timeFilter":
            return f"{args[0]} BETWEEN '{start}' AND '{end}'"
        if name == "timeFrom":
            return f"'{start}'"
        if name == "timeTo":
            return f"'{end}'"
        if name in ("timeGroup", "timeGroupAlias"):
            if len(args) < 2:
                raise MacroError(f"$__{name} needs a column and an interval")
            step = parse_interval(args[1])
            expr = f"floor(extract(epoch from {args[0]})/{step:g})*{step:g}"
            return expr + (' AS "time"' if name == "timeGroupAlias" else "")
        raise MacroError(f"unsupported macro $__{name}")

    sql = _MACRO.sub(sub, sql)
    if "$" in re.sub(r"\$\$.*?\$\$", "", sql, flags=re.S):
        raise MacroError(f"unexpanded '$' left in query:\n{sql}")
    return sql
