"""Explanations: which input features drove a row's score.

A detector gives per-output-column error terms for each row (the VAE's reconstruction error, the
knn member's squared differences to the nearest reference row); one-hot columns are summed back
into their categorical feature, and each row's terms are normalised to shares that sum to 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def feature_shares(terms: np.ndarray, output_source: np.ndarray, n_inputs: int) -> np.ndarray:
    """``(rows, n_inputs)`` shares of each row's ``terms`` (rows x output columns) per input
    feature (``output_source``: the input feature of each output column); all-zero rows stay 0."""
    agg = np.zeros((terms.shape[0], n_inputs))
    np.add.at(agg.T, output_source, terms.T)
    total = agg.sum(1, keepdims=True)
    return np.divide(agg, total, out=np.zeros_like(agg), where=total > 0)


def top_features(
    frame: pd.DataFrame, names: list[str], shares: np.ndarray, rows: np.ndarray, top: int
) -> list[list[dict[str, Any]]]:
    """For each of ``rows`` (positions in ``frame``, one per row of ``shares``), its ``top``
    features by share: ``[{"feature", "value", "contribution"}]``, values JSON-safe."""
    orders = np.argsort(-shares, axis=1, kind="stable")[:, :top]
    # The needed rows of the columns some row names, column by column from the arrays
    # themselves (a frame-level take then to_numpy costs ~3x more with Arrow string
    # columns), then plain Python lookups.
    take = np.asarray(rows, dtype=np.int64)
    values = np.empty((len(take), len(names)), dtype=object)
    for j in np.unique(orders).tolist():
        values[:, j] = np.asarray(frame[names[j]].array.take(take), dtype=object)
    out = []
    for k, (share, order) in enumerate(zip(shares, orders, strict=True)):
        items = []
        for j in order.tolist():
            items.append(
                {
                    "feature": names[j],
                    "value": json_value(values[k, j]),
                    "contribution": round(float(share[j]), 4),
                }
            )
        out.append(items)
    return out


def json_safe(value: Any) -> Any:
    """``value`` with every dict, list and tuple in it rebuilt as JSON holds them (text keys,
    lists) and every other value as ``json_value`` gives it."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return json_value(value)


def json_value(value: Any) -> Any:
    """A feature's value as JSON can hold it: NumPy scalars as Python ones, and None for any
    missing value (NaN, None, and the pd.NA / NaT of nullable columns, which ``json`` refuses)
    and for infinities (no JSON number)."""
    if isinstance(value, np.generic):
        value = value.item()
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
