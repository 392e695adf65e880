"""Exact ``np.searchsorted`` and ``np.interp`` over a fixed sorted array, several times faster.

Scoring searches two fixed sorted arrays for every value: the quantile transform's knots (up to
1,000 per numeric column) and each detector's calibration scores (tens of thousands). NumPy finds
each position by a binary search whose branches the CPU cannot predict, 60-110 ns per value: that
made these searches more than a third of the CPU cost of scoring.

``SortedSearch`` finds the position in two cheap vectorised steps instead:

1. a uniform grid over the array's range, laid either on the raw values or on
   ``asinh((x - center) / scale)`` (which spreads out the crowded core of a heavy-tailed column),
   maps each value to a cell, and a table gives a position at or before the answer for any value
   in that cell;
2. at most ``window`` steps forward, each a comparison in the *raw* value space, count the
   remaining array entries below the value.

The grid only picks where the counting starts; the comparisons that decide the answer are the
ones a binary search makes, so results equal NumPy's (tests check equality on random and
adversarial arrays). At construction the grid (domain and size) is chosen to keep the window
short; an array that defeats every grid (window still long, e.g. heavy ties or knots spread over
hundreds of decades) keeps NumPy's search.

``KnotLookupBlock`` runs the lookups of many columns through the same NumPy calls, with the same
result for each column: for small batches, the fixed cost of a dozen calls per column is most of
the work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np

GRID_SIZES = (4096, 16384, 65536)
MAX_WINDOW = 16  # ~0.3 ms per step per 100k values; a binary search costs ~6-11 ms
_ASINH_COST = 2  # extra passes over the data for the asinh domain, in "window steps"

Side = Literal["left", "right"]


class SortedSearch:
    """``search(x)`` == ``np.searchsorted(values, x, side)`` for a fixed sorted ``values``."""

    def __init__(
        self, values: np.ndarray, side: Side = "left", center: float = 0.0, scale: float = 1.0
    ) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        if self.values.ndim != 1 or len(self.values) == 0:
            raise ValueError("need a non-empty 1-D sorted array")
        self.side = side
        self.center = float(center)
        self.inv_scale = 1.0 / float(scale) if scale > 0 else 1.0
        self._choose_grid()

    # ------------------------------------------------------------------ building
    def _domain(self, x: np.ndarray, asinh: bool) -> np.ndarray:
        if not asinh:
            return x
        with np.errstate(over="ignore"):  # inf for absurd scales; _grid then rejects the grid
            return np.arcsinh((x - self.center) * self.inv_scale)

    def _grid(self, asinh: bool, size: int) -> tuple[float, float, np.ndarray, int] | None:
        v = self._domain(self.values, asinh)
        span = v[-1] - v[0]
        if not np.isfinite(span) or span <= 0:
            return None
        per_unit = size / span
        edges = v[0] + np.arange(size + 1) / per_unit
        pos = np.searchsorted(v, edges, side=self.side)
        # Where a cell's counting starts. On the raw values an entry equal to the cell's lower edge
        # is at or below every value in the cell, so side="right" may start past it. After asinh,
        # distinct values can round to one point (0, 5e-324 and 1e-323 all map to asinh(-c/s)):
        # an entry equal to the edge there may still be above a value in the cell, so counting
        # starts before every such entry.
        low = pos if not asinh or self.side == "left" else np.searchsorted(v, edges, side="left")
        # One entry of slack on each side: a value's cell is computed in floating point and may
        # land one cell off at a boundary; the raw-space comparisons then still count right.
        start = np.clip(low[:-1] - 1, 0, len(v))
        stop = np.clip(pos[1:] + 1, 0, len(v))
        window = int(np.max(stop - start))
        return float(v[0]), float(per_unit), start.astype(np.int32), window

    def _choose_grid(self) -> None:
        best = None
        for asinh in (False, True):
            for size in GRID_SIZES:
                grid = self._grid(asinh, size)
                if grid is None:
                    continue
                cost = grid[3] + (_ASINH_COST if asinh else 0)
                if best is None or cost < best[0]:
                    best = (cost, asinh, size, grid)
        self.use_grid = best is not None and best[3][3] <= MAX_WINDOW
        if not self.use_grid:
            return
        _, self.asinh, self.size, (self.origin, self.per_unit, self.start, self.window) = best
        # Padded with NaN so the forward steps never index past the end: NaN is never below x.
        self._padded = np.concatenate([self.values, np.full(self.window + 1, np.nan)])

    # ---------------------------------------------------------------- searching
    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if not self.use_grid:
            return np.searchsorted(self.values, x, side=self.side)
        with np.errstate(invalid="ignore"):
            cell = (self._domain(x, self.asinh) - self.origin) * self.per_unit
            # fmax/fmin rather than clip: they also send NaN (and inf) into a valid cell.
            np.fmin(np.fmax(cell, 0.0, out=cell), self.size - 1, out=cell)
            cell = cell.astype(np.intp)
        base = self.start.take(cell).astype(np.intp)
        pos = base.copy()
        below = np.less if self.side == "left" else np.less_equal
        for step in range(self.window):
            pos += below(self._padded.take(base + step), x)
        # NumPy sorts NaN last: searchsorted puts it after every value, on either side.
        nan = np.isnan(x)
        if nan.any():
            pos[nan] = len(self.values)
        return pos


def segment_slopes(knots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The slope of each knot segment, then 0 for the last knot: what ``KnotLookup`` (and the
    torch mirror in ``anomaly.scoring.device_scoring``) multiplies the offset from the segment's
    left knot by.

    A segment narrower than about 1e-300 (knots of subnormal values, e.g. ``[0, 5e-324]``) or of
    zero width makes the division overflow to inf (or give NaN for 0/0); ``0 * inf`` at its left
    knot is then NaN, and a NaN scores as the most anomalous row. Such a segment gets slope 0
    instead: the lookup holds the left knot's value up to the next knot, where it takes that
    knot's value. That stays finite and increasing, equals ``np.interp`` at every knot, and moves
    nothing else (only a value strictly inside a segment that narrow, where ``np.interp`` itself
    gives inf, gets a different answer).
    """
    knots = np.asarray(knots, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        slope = np.diff(values) / np.diff(knots)
    slope[~np.isfinite(slope)] = 0.0
    return np.append(slope, 0.0)


class KnotLookup:
    """``lookup(x)`` == ``np.interp(x, knots, values)`` for strictly increasing ``knots``
    (outside the knots' range the end values, as ``np.interp``; NaN stays NaN), except inside a
    segment too narrow for its slope to be finite, where it is the left knot's value (see
    ``segment_slopes``): finite where ``np.interp`` gives inf."""

    def __init__(self, knots: np.ndarray, values: np.ndarray, center: float, scale: float):
        self.knots = np.asarray(knots, dtype=np.float64)
        self.values = np.asarray(values, dtype=np.float64)
        if self.knots.ndim != 1 or len(self.knots) != len(self.values) or len(self.knots) < 2:
            raise ValueError("need at least two knots and one value per knot")
        self._search = SortedSearch(self.knots, "right", center, scale)
        self._slope = segment_slopes(self.knots, self.values)
        # Segments whose slope overflowed (set to 0 above); np.interp, used where no grid helps,
        # gives inf strictly inside them, so its answer there is replaced (see _interp).
        self._steps = np.flatnonzero(self._slope[:-1] == 0.0)
        self._steps = self._steps[self.values[self._steps + 1] != self.values[self._steps]]

    @property
    def use_grid(self) -> bool:
        return self._search.use_grid

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if not self.use_grid:
            return self._interp(x)
        inside = np.clip(x, self.knots[0], self.knots[-1])
        j = self._search(inside)
        j -= 1  # last knot at or below the value
        np.clip(j, 0, len(self.knots) - 2, out=j)
        return self.values.take(j) + (inside - self.knots.take(j)) * self._slope.take(j)

    def _interp(self, x: np.ndarray) -> np.ndarray:
        """``np.interp``, with a value strictly inside a segment too narrow for a finite slope
        given the segment's left value, as the grid path gives it (``segment_slopes``)."""
        out = np.interp(x, self.knots, self.values)
        if len(self._steps):
            j = np.searchsorted(self.knots, x, side="right") - 1
            inside_step = np.isin(j, self._steps)
            out[inside_step] = self.values[j[inside_step]]
        return out


@contextmanager
def row_sized_ufunc_buffers(row_length: int) -> Iterator[None]:
    """Ufunc buffers no longer than the rows of the 2-D blocks worked on, for the ``with`` block.

    With a per-row operand (shape ``(columns, 1)``) NumPy cannot merge the rows into one loop,
    and when a row is shorter than its buffer size (8,192 elements) it copies the data through
    buffers to make longer loops: 2-4x the cost of the operation itself on (30, 2048) blocks.
    Buffers no longer than a row make it loop over each row in place. Only speed changes: each
    element meets the same operation either way. The setting is per thread and restored on exit.
    """
    size = max(16, min(np.getbufsize(), row_length // 16 * 16))  # NumPy 1.x: a multiple of 16
    old = np.setbufsize(size)
    try:
        yield
    finally:
        np.setbufsize(old)


class KnotLookupBlock:
    """Several ``KnotLookup`` at once: ``block(x)[:, i] == lookups[i](x[:, i])`` bit for bit, for
    a float64 block ``x`` of shape ``(rows, len(lookups))``.

    A per-column call costs a dozen NumPy calls of fixed overhead (a few microseconds each), which
    dominates small batches: 30 columns of 2,000 rows spent more time in that overhead than in the
    arithmetic. Here every grid column is searched by the same calls: the columns' knots are laid
    end to end in one array, each segment followed by NaN padding longer than the longest window,
    and their grid tables likewise, with each column's offset added, so one ``take`` serves every
    column. Each value goes through the same cell, start and comparisons as in its own column's
    search, so it finds the same knot and meets the same arithmetic. Columns without a grid keep
    ``np.interp``, one at a time.
    """

    def __init__(self, lookups: Sequence[KnotLookup]) -> None:
        self.lookups = list(lookups)
        grid = [i for i, lk in enumerate(self.lookups) if lk.use_grid]
        self._interp_cols = [i for i, lk in enumerate(self.lookups) if not lk.use_grid]
        # Grid columns, longest window first: forward step s then only touches the leading rows
        # whose window exceeds s, a contiguous slice, so a column with a long window does not make
        # every column take its number of steps.
        grid.sort(key=lambda i: -self.lookups[i]._search.window)
        self._grid_cols = np.asarray(grid, dtype=np.intp)
        self._grid_in_order = grid == list(range(len(self.lookups)))
        if not grid:
            return
        searches = [self.lookups[i]._search for i in grid]
        windows = [s.window for s in searches]
        self._step_rows = [sum(w > step for w in windows) for step in range(windows[0])]
        pad = windows[0] + 1
        knots, starts, at_knot, at_value, at_slope = [], [], [], [], []
        offset = 0
        for i, search in zip(grid, searches, strict=True):
            lk = self.lookups[i]
            n = len(lk.knots)
            knots += [lk.knots, np.full(pad, np.nan)]
            starts.append(search.start.astype(np.intp) + offset)
            # Indexed by the search's count p of knots at or below the value (0..n), the segment
            # KnotLookup interpolates on: j = clip(p - 1, 0, n - 2), looked up once here.
            j = np.clip(np.arange(n + pad) - 1, 0, n - 2)
            at_knot.append(lk.knots[j])
            at_value.append(lk.values[j])
            at_slope.append(lk._slope[j])
            offset += n + pad
        self._knots = np.concatenate(knots)
        self._starts = np.concatenate(starts)
        self._at_knot = np.concatenate(at_knot)
        self._at_value = np.concatenate(at_value)
        self._at_slope = np.concatenate(at_slope)

        def column(v: Sequence[float], dtype: type = np.float64) -> np.ndarray:
            return np.asarray(v, dtype=dtype).reshape(-1, 1)  # broadcasts over (columns, rows)

        self._lo = column([self.lookups[i].knots[0] for i in grid])
        self._hi = column([self.lookups[i].knots[-1] for i in grid])
        self._origin = column([s.origin for s in searches])
        self._per_unit = column([s.per_unit for s in searches])
        self._max_cell = column([s.size - 1 for s in searches])
        self._cell_offset = column(np.cumsum([0] + [s.size for s in searches[:-1]]), np.intp)
        asinh = [r for r, s in enumerate(searches) if s.asinh]
        self._asinh_rows = np.asarray(asinh, dtype=np.intp)
        self._center = column([searches[r].center for r in asinh])
        self._inv_scale = column([searches[r].inv_scale for r in asinh])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.lookups):
            raise ValueError(f"need a block of shape (rows, {len(self.lookups)}), got {x.shape}")
        # Worked on the transpose, one column per row: NumPy's column-major blocks (a DataFrame's)
        # then stay contiguous along each column.
        xt = x.T
        with row_sized_ufunc_buffers(xt.shape[1]):
            if self._grid_in_order:
                return self._grid_lookup(xt).T
            zt = np.empty(xt.shape)
            if len(self._grid_cols):
                zt[self._grid_cols] = self._grid_lookup(xt[self._grid_cols])
        for i in self._interp_cols:
            lk = self.lookups[i]
            zt[i] = lk._interp(xt[i])
        return zt.T

    def _grid_lookup(self, xt: np.ndarray) -> np.ndarray:
        """``KnotLookup.__call__`` of every grid column (``xt``: one column per row, in the order
        of ``_grid_cols``), with the same operations on each value."""
        inside = np.clip(xt, self._lo, self._hi)
        with np.errstate(invalid="ignore", over="ignore"):
            if len(self._asinh_rows):
                cell = inside.copy()
                a = self._asinh_rows
                cell[a] = np.arcsinh((inside[a] - self._center) * self._inv_scale)
                cell -= self._origin
            else:
                cell = inside - self._origin
            cell *= self._per_unit
            # fmax/fmin rather than clip: they also send NaN (and inf) into a valid cell.
            np.fmin(np.fmax(cell, 0.0, out=cell), self._max_cell, out=cell)
        idx = cell.astype(np.intp)
        idx += self._cell_offset
        base = self._starts.take(idx)
        # side="right", as KnotLookup's search: count the knots at or below the value. Steps past
        # a column's own window compare knots above its answer, or NaN padding: they add nothing.
        # Counted in bytes (NumPy bools are 0/1 bytes): adding them costs a fraction of adding
        # each step's bools to the int64 positions.
        count = np.less_equal(self._knots.take(base), inside).view(np.uint8)
        below = np.empty(base.shape, dtype=bool)
        for step in range(1, len(self._step_rows)):
            m = self._step_rows[step]
            # A view shifted by `step` rather than `base + step`: no index array per step.
            np.less_equal(self._knots[step:].take(base[:m]), inside[:m], out=below[:m])
            count[:m] += below[:m].view(np.uint8)
        pos = np.add(base, count, out=base)
        return self._at_value.take(pos) + (inside - self._at_knot.take(pos)) * self._at_slope.take(
            pos
        )
