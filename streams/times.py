"""The time field's values (ISO 8601 strings or epoch seconds) as UTC ``datetime64[ns]``.

What a time string means is pandas' ISO 8601 parse of it (``pd.to_datetime(format="ISO8601")``,
``parse_iso``); tests/streams/test_decode.py checks everything here against it.

``parse_iso_fast`` reads the common fixed layouts with array arithmetic on the strings' bytes and
leaves every other string to pandas. It stays because it wins clearly on the whole decode path:
bench/decode.py (fraud schema, 2000-record batches, best of 30 rounds, same process) measured
1.14-1.65 us/record with it against 1.41-2.15 us/record with pandas alone (0.77-0.91x in four
runs); per string 0.066 us against pandas' 0.21 us. ``datetime.fromisoformat`` is no substitute:
0.24-0.30 us/string in a loop, microseconds only (nanosecond fractions are truncated), and it
accepts layouts pandas rejects.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


def parse_times(column: Sequence[Any]) -> tuple[np.ndarray, list[int]]:
    """ISO 8601 strings or epoch seconds to UTC timestamps (``datetime64[ns]``, NaT where
    invalid); returns the rows that failed."""
    n = len(column)
    if n and isinstance(column[0], str):
        try:
            ns, ok = parse_iso_fast(column)
        except TypeError:  # not all strings
            pass
        else:
            result = ns.view("datetime64[ns]")
            if ok.all():
                return result, []
            rest = np.flatnonzero(~ok)
            values = parse_iso([column[i] for i in rest])
            result[rest] = values
            return result, rest[np.isnat(values)].tolist()
    result = np.full(n, np.datetime64("NaT", "ns"), dtype="datetime64[ns]")
    if n == 0:
        return result, []
    types = set(map(type, column))
    if str in types and len(types) > 1:
        is_str = np.fromiter((isinstance(v, str) for v in column), dtype=bool, count=n)
    else:
        is_str = np.full(n, str in types)
    bad: list[int] = []
    if (~is_str).any():
        rows = np.flatnonzero(~is_str)
        secs = np.array(column if len(rows) == n else [column[i] for i in rows], dtype=np.float64)
        # Outside 1677..2262 the ns timestamp overflows: treat as invalid.
        ok = np.isfinite(secs) & (np.abs(secs) < 9.2e9)
        ns = np.zeros(len(rows), dtype=np.int64)
        # Microseconds are exact in float64 for these epochs; nanoseconds are not.
        ns[ok] = np.round(secs[ok] * 1e6).astype(np.int64) * 1000
        result[rows[ok]] = ns[ok].view("datetime64[ns]")
        bad.extend(int(r) for r in rows[~ok])
    if is_str.any():
        rows = np.flatnonzero(is_str)
        strings = [column[i] for i in rows]
        ns, ok = parse_iso_fast(strings)
        result[rows[ok]] = ns[ok].view("datetime64[ns]")
        if not ok.all():
            rest = np.flatnonzero(~ok)
            values = parse_iso([strings[i] for i in rest])
            result[rows[rest]] = values
            bad.extend(int(r) for r in rows[rest[np.isnat(values)]])
    return result, sorted(bad)


# pandas 2's ISO 8601 parser carries one string's UTC offset over to the naive strings after it
# in the same call (2.3.3: ["2024-03-01T10:00:00+02:00", "1970-01-01T00:00:00"] gives 1969-12-31
# 22:00 for the second); pandas 3 does not.
_PANDAS_MIXES_OFFSETS = int(pd.__version__.split(".")[0]) < 3


def parse_iso(strings: list[str]) -> np.ndarray:
    """The general ISO 8601 parser (pandas'), NaT where invalid or outside the ns range."""
    if _PANDAS_MIXES_OFFSETS and len(strings) > 1:
        # One call per distinct string (only the strings the fast path left, rarely many).
        parsed_once = {s: parse_iso([s])[0] for s in dict.fromkeys(strings)}
        return np.array([parsed_once[s] for s in strings], dtype="datetime64[ns]")
    parsed = pd.to_datetime(
        pd.Series(strings, dtype=object), utc=True, format="ISO8601", errors="coerce"
    )
    values = parsed.dt.tz_localize(None).to_numpy()
    unit, _ = np.datetime_data(values.dtype)
    if unit == "ns":
        return values
    # pandas >= 3 parses at the coarsest unit the strings need (us for most), where years past
    # 2262 fit; converting those to ns would wrap around silently, so they are invalid here.
    per = int(np.timedelta64(1, unit) // np.timedelta64(1, "ns"))
    raw = values.view(np.int64)
    fits = ~np.isnat(values) & (np.abs(raw) <= (2**63 - 1) // per)
    return np.where(fits, raw * per, np.iinfo(np.int64).min).view("datetime64[ns]")


# The fast ISO 8601 path reads the common fixed layouts (YYYY-MM-DD, 'T' or ' ', HH:MM:SS, an
# optional fraction of 1-9 digits, then nothing, 'Z' or +HH:MM/-HH:MM) with array arithmetic.
# A string it does not accept goes to pandas, so it only has to be right on what it accepts: the
# exact layout, fields in range, and years that stay inside the ns range whatever the offset.
_ISO_MIN_YEAR, _ISO_MAX_YEAR = 1678, 2261
# Days since the epoch of the first of each month from _ISO_MIN_YEAR to the month after
# _ISO_MAX_YEAR (numpy's calendar: proleptic Gregorian, as pandas').
_MONTH_STARTS = (
    np.arange((_ISO_MIN_YEAR - 1970) * 12, (_ISO_MAX_YEAR + 1 - 1970) * 12 + 1)
    .astype("datetime64[M]")
    .astype("datetime64[D]")
    .view(np.int64)
)


@dataclass(frozen=True)
class _IsoLayout:
    length: int
    fraction: int  # digits after the '.', 0 when none
    offset: int | None  # position of the '+'/'-' of the offset, None when 'Z' or no zone
    # Per position (as columns, to broadcast over strings x positions transposed): a byte b
    # passes when (b - low) mod 256 <= span, i.e. a digit, the one expected byte, or anything
    # (the 'T'/' ' and the offset's sign, checked on their own).
    low: np.ndarray
    span: np.ndarray


@functools.lru_cache(maxsize=64)
def _iso_layout(length: int, fraction: int, zone: str) -> _IsoLayout:
    """zone: '' (naive, read as UTC), 'Z' or '+' (an offset of either sign)."""
    template = "0000-00-00T00:00:00" + ("." + "0" * fraction if fraction else "")
    offset = None
    if zone == "+":
        offset = len(template)
        template += "+00:00"
    else:
        template += zone
    assert len(template) == length
    low = np.frombuffer(template.encode(), dtype=np.uint8).copy()
    span = np.where(low == ord("0"), 9, 0).astype(np.uint8)
    free = [10] if offset is None else [10, offset]
    low[free], span[free] = 0, 255
    return _IsoLayout(length, fraction, offset, low[:, None], span[:, None])


def _layout_of(text: str) -> _IsoLayout | None:
    length = len(text)
    if length < 19:
        return None
    fraction = 0
    if length > 20 and text[19] == ".":
        while fraction < 10 and 20 + fraction < length and text[20 + fraction].isdigit():
            fraction += 1
        if not 1 <= fraction <= 9:
            return None
    zone = text[19 + (fraction + 1 if fraction else 0) :]
    if zone in ("", "Z"):
        return _iso_layout(length, fraction, zone)
    if len(zone) == 6 and zone[0] in "+-":
        return _iso_layout(length, fraction, "+")
    return None


def parse_iso_fast(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """int64 ns since the epoch (UTC) and, per string, whether the fast path read it; TypeError
    when a value is not a string."""
    n = len(strings)
    # One string per row of a byte matrix. 'replace' keeps one byte per character (a non-ASCII
    # one becomes '?', which no layout accepts). With a '\n' after every string, the bytes fit the
    # matrix with every '\n' in the last column only if every string has the layout's length.
    # (The join raises TypeError when a value is not a string.)
    buf = ("\n".join(strings) + "\n").encode("ascii", "replace")
    ns = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    layout = _layout_of(strings[0]) if n else None
    if layout is None:
        return ns, ok
    width = layout.length + 1
    if len(buf) == n * width:
        matrix = np.frombuffer(buf, dtype=np.uint8).reshape(n, width)
        if np.count_nonzero(matrix == 10) == n and (matrix[:, -1] == 10).all():
            return _read_layout(matrix[:, :-1], layout)
    # Mixed lengths: one pass per length whose first string has a layout we read.
    lengths = np.fromiter(map(len, strings), dtype=np.intp, count=n)
    for length, first in zip(*np.unique(lengths, return_index=True), strict=True):
        layout = _layout_of(strings[first])
        if layout is None:
            continue
        rows = np.flatnonzero(lengths == length)
        buf = "".join([strings[i] for i in rows]).encode("ascii", "replace")
        matrix = np.frombuffer(buf, dtype=np.uint8).reshape(len(rows), int(length))
        ns[rows], ok[rows] = _read_layout(matrix, layout)
    return ns, ok


def _read_layout(matrix: np.ndarray, layout: _IsoLayout) -> tuple[np.ndarray, np.ndarray]:
    """matrix: strings x layout.length bytes. Returns ns since the epoch and which were read."""
    # Positions x strings: every operation below runs along the long axis.
    chars = np.ascontiguousarray(matrix.T)
    ok = ~((chars - layout.low) > layout.span).any(axis=0)
    ok &= (chars[10] == ord("T")) | (chars[10] == ord(" "))
    digit = chars - np.uint8(48)
    starts = [0, 2, 5, 8, 11, 14, 17]
    if layout.offset is not None:
        starts += [layout.offset + 1, layout.offset + 4]
    # The two-digit numbers (meaningful where ok).
    pairs = digit[starts].astype(np.int64) * 10 + digit[[i + 1 for i in starts]]
    year = pairs[0] * 100 + pairs[1]
    month, day, hour, minute, second = pairs[2:7]
    ok &= (year >= _ISO_MIN_YEAR) & (year <= _ISO_MAX_YEAR) & (month >= 1) & (month <= 12)
    ok &= (hour <= 23) & (minute <= 59) & (second <= 59)
    # Days from 1970-01-01 to the first of the month and of the next (out of range rows read
    # some other month: they are not ok already).
    months = (year - _ISO_MIN_YEAR) * 12 + month - 1
    first = _MONTH_STARTS.take(months, mode="clip")
    after = _MONTH_STARTS.take(months + 1, mode="clip")
    ok &= (day >= 1) & (day <= after - first)
    secs = (first + day - 1) * 86_400 + hour * 3600 + minute * 60 + second
    if layout.offset is not None:
        sign = chars[layout.offset]
        off_hour, off_minute = pairs[7:9]
        ok &= ((sign == ord("+")) | (sign == ord("-"))) & (off_hour <= 23) & (off_minute <= 59)
        offset = off_hour * 3600 + off_minute * 60
        secs -= np.where(sign == ord("-"), -offset, offset)
    ns = secs * 1_000_000_000
    if layout.fraction:
        scale = 10 ** np.arange(8, 8 - layout.fraction, -1, dtype=np.int64)
        ns += scale @ digit[20 : 20 + layout.fraction]
    return ns, ok
