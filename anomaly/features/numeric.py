"""The numeric transforms: each column's parameters fit on training values
(``fit_numeric_params``) and the transform of every numeric column at once
(``NumericBlockTransform``). The rules are in the module docstring of
``anomaly.features.preprocess``."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.special import ndtri

from anomaly.errors import DataError
from anomaly.features.knot_lookup import KnotLookup, KnotLookupBlock

NUMERIC_TRANSFORMS = ("quantile", "robust", "signed_log")
_GAUSS_IQR = 1.349  # IQR of a standard normal


class ConstantColumnWarning(UserWarning):
    """A numeric feature had a single value in the training data."""


@dataclass
class NumericParams:
    median: float
    scale: float
    # Quantile transform knots (unique, increasing) and their standard-normal images.
    knots: list[float] = field(default_factory=list)
    normal: list[float] = field(default_factory=list)
    # Mean and standard deviation of the training values: the column's plain z-score in the
    # linear view (``Preprocessor.linear_view``). None in bundles from before that view.
    mean: float | None = None
    std: float | None = None
    # The training CDF at each knot, P(X <= knot), for the drift monitor's bins: on a discrete
    # column the knots between two levels carry no mass, which the knots' normal images cannot
    # tell. None in bundles from before it (``anomaly.monitoring.drift.knot_spans``).
    cdf: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, as the bundle manifest stores it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, v: dict[str, Any]) -> NumericParams:
        """From ``to_dict``'s form; mean, std and cdf are missing in bundles saved before them."""

        def floats(key: str) -> list[float] | None:
            return None if v.get(key) is None else [float(x) for x in v[key]]

        return cls(
            median=float(v["median"]),
            scale=float(v["scale"]),
            knots=floats("knots") or [],
            normal=floats("normal") or [],
            mean=None if v.get("mean") is None else float(v["mean"]),
            std=None if v.get("std") is None else float(v["std"]),
            cdf=floats("cdf"),
        )


def never_seen_scale(n: int) -> float:
    """The standard deviation of an indicator of a value none of ``n`` training rows showed.

    By the rule of succession such a value has a probability of about p = 1/(n+2); scaled as an
    indicator with that rarity (standard deviation sqrt(p(1-p))), it lands about sqrt(n) out, as
    surprising as a flag never raised in training rather than one ordinary standard deviation.
    Used for constant numeric columns and for categories never seen in training."""
    p = 1.0 / (n + 2)
    return math.sqrt(p * (1.0 - p))


def fit_numeric_params(
    name: str, values: np.ndarray, numeric_transform: str, n_quantiles: int
) -> NumericParams:
    """A numeric column's transform parameters from its finite training values (the module
    docstring of ``anomaly.features.preprocess`` has the rules)."""
    median = float(np.median(values))
    q25, q75 = np.quantile(values, [0.25, 0.75])
    scale = float(q75 - q25) / _GAUSS_IQR
    mean, std = mean_and_std(values)
    if not scale > 0:
        scale = std
    if not scale > 0:
        warnings.warn(
            f"numeric column '{name}' is constant ({median:g}) in the training data; it is "
            "kept, and any other value at scoring time counts as a value never seen",
            ConstantColumnWarning,
            stacklevel=3,
        )
        # Any other value is one none of the training rows showed: a unit deviation counts as
        # a flag never raised in training (z ~ sqrt(n)), not as one ordinary deviation.
        scale = never_seen_scale(len(values))
    params = NumericParams(median=median, scale=scale, mean=mean, std=std if std > 0 else scale)
    if numeric_transform == "quantile" and len(np.unique(values)) == 2:
        # An indicator column: standardised (centre = mean, scale = std), not mapped onto
        # normal quantiles. The quantile map gives its two values a gap that shrinks as the
        # rarer value gets rarer (0.06 and 1.96 at 5%); the z-score's gap, 1/sqrt(p(1-p)),
        # grows with rarity, so a rare flag counts as the surprise it is.
        params.median, params.scale = mean, std
        return _checked_finite(name, params)
    if numeric_transform == "quantile":
        n_q = int(min(n_quantiles, len(values)))
        probs = np.linspace(0.0, 1.0, max(n_q, 2))
        knots = np.quantile(values, probs)
        # Ties (discrete columns) collapse to one knot at the middle of their probability span.
        uniq, inverse = np.unique(knots, return_inverse=True)
        mid_probs = np.bincount(inverse, weights=probs) / np.bincount(inverse)
        # Keep the extreme knots strictly inside (0, 1) so their normal image is finite.
        eps = 0.5 / len(values)
        mid_probs = np.clip(mid_probs, eps, 1 - eps)
        normal = np.zeros(1) if len(uniq) == 1 else ndtri(mid_probs)
        params.knots = [float(v) for v in uniq]
        params.normal = [float(v) for v in normal]
        below = np.searchsorted(np.sort(values), uniq, side="right") / len(values)
        params.cdf = [round(float(v), 6) for v in below]  # a drift bin needs no more digits
    return _checked_finite(name, params)


def mean_and_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of finite ``values``; where the plain sums overflow (values
    beyond ~1e154 square past the largest float), computed on the values divided by the largest
    magnitude and scaled back, so a column of huge finite numbers keeps finite parameters."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = float(np.mean(values)), float(np.std(values))
        if math.isfinite(mean) and math.isfinite(std):
            return mean, std  # the usual case, bit for bit as before
        peak = float(np.max(np.abs(values)))
        scaled = values / peak
        return float(np.mean(scaled)) * peak, float(np.std(scaled)) * peak


def _checked_finite(name: str, params: NumericParams) -> NumericParams:
    """``params``, or a DataError naming the column if any is not finite: a bundle stores such a
    number as null and could not be loaded again."""
    numbers = [params.median, params.scale, params.mean, params.std, *params.knots]
    if not all(v is not None and math.isfinite(v) for v in numbers):
        raise DataError(
            f"numeric column '{name}': its values are too large to standardise (median "
            f"{params.median:g}, scale {params.scale:g}); rescale the column, e.g. to other units"
        )
    return params


class NumericBlockTransform:
    """The numeric transform (module docstring) of every numeric column at once.

    Called on a finite ``(columns, rows)`` block, one feature per row; returns the clipped
    float64 result in the same layout. Columns with quantile knots go through one
    ``KnotLookupBlock`` (== ``np.interp`` on each column's knots) and the log1p tails beyond
    their knots; the rest (robust, signed_log, and quantile columns that were constant in
    training) through ``(x - median) / scale``. Each element meets the same floating-point
    operations as a column-by-column computation would, and log1p always runs over contiguous
    arrays, so results do not depend on the batch's layout.
    """

    def __init__(
        self,
        params: list[NumericParams],
        lookups: dict[int, KnotLookup],
        signed_log: bool,
        clip: float,
    ) -> None:
        def column(v: list[float]) -> np.ndarray:
            return np.asarray(v, dtype=np.float64).reshape(-1, 1)  # broadcasts over rows

        self.n = len(params)
        self.clip = clip
        self.signed_log = signed_log
        self.median = column([p.median for p in params])
        quantile = sorted(lookups)
        self.quantile = np.asarray(quantile, dtype=np.intp)
        self.linear = np.asarray([i for i in range(self.n) if i not in lookups], dtype=np.intp)
        self.lookup = KnotLookupBlock([lookups[i] for i in quantile]) if quantile else None
        self.lo_knot = column([lookups[i].knots[0] for i in quantile])
        self.hi_knot = column([lookups[i].knots[-1] for i in quantile])
        # 1-D: indexed by each tail value's column
        self.lo_normal = np.asarray([lookups[i].values[0] for i in quantile])
        self.hi_normal = np.asarray([lookups[i].values[-1] for i in quantile])
        self.q_scale = np.asarray([params[i].scale for i in quantile])
        self.lin_median = column([params[i].median for i in self.linear])
        self.lin_scale = column([params[i].scale for i in self.linear])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # No quantile column (none at all, too, in a model of categorical features only): the
        # linear arithmetic, which broadcasts over zero columns as over any other number.
        if not len(self.quantile):
            z = self._linear(x)
        elif not len(self.linear):
            z = self._quantile(x)
        else:
            z = np.empty(x.shape)
            z[self.quantile] = self._quantile(x[self.quantile])
            z[self.linear] = self._linear(x[self.linear])
        return np.clip(z, -self.clip, self.clip, out=z)

    def _quantile(self, x: np.ndarray) -> np.ndarray:
        assert self.lookup is not None
        z = np.ascontiguousarray(self.lookup(x.T).T)
        # Values beyond the knots are few: found by flat position, then handled one by one.
        rows = x.shape[1]
        hi = x > self.hi_knot
        if hi.any():
            at = np.flatnonzero(hi)
            col = at // rows
            excess = (x.take(at) - self.hi_knot[col, 0]) / self.q_scale[col]
            z.put(at, self.hi_normal[col] + np.log1p(excess))
        lo = x < self.lo_knot
        if lo.any():
            at = np.flatnonzero(lo)
            col = at // rows
            excess = (self.lo_knot[col, 0] - x.take(at)) / self.q_scale[col]
            z.put(at, self.lo_normal[col] - np.log1p(excess))
        return z

    def _linear(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.lin_median) / self.lin_scale
        if self.signed_log:
            z = np.sign(z) * np.log1p(np.abs(z))
        return z
