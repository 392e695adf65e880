"""Categorical columns: the vocabulary kept from training and each value's position in it.

Values are compared as strings. A value outside the vocabulary (unseen, cut by
``max_categories``, or missing) has position -1; the preprocessor sends it to the column's
``__unseen__`` bucket.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from anomaly.features.columns import arrow_strings


def fit_vocabulary(column: pd.Series, max_categories: int) -> list[str]:
    """The ``max_categories`` most frequent values of ``column`` as strings (ties by name), sorted,
    so the vocabulary and the one-hot layout are deterministic."""
    counts = column.dropna().astype(str).value_counts(sort=False)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return sorted(k for k, _ in ordered[:max_categories])


class CategoryLookup:
    """A column's vocabulary and the lookups built from it on first use (never saved)."""

    def __init__(self, vocabulary: list[str]) -> None:
        self.vocabulary = vocabulary
        self._index: pd.Index | None = None
        self._arrow: dict[Any, pc.SetLookupOptions] = {}

    def codes(self, raw: pd.Series) -> tuple[np.ndarray, bool]:
        """Each value's position in the vocabulary (-1: unseen or missing), and whether any value
        is missing."""
        arrow = arrow_strings(raw)
        if arrow is not None:
            return self._arrow_codes(arrow), bool(arrow.null_count)
        return self._object_codes(raw), bool(raw.isna().any())

    def _arrow_codes(self, values: Any) -> np.ndarray:
        """For a column of Arrow strings, in Arrow (one hash lookup per value, no Python object per
        value): the same codes as ``_object_codes``, since both compare the strings."""
        lookup = self._arrow.get(values.type)
        if lookup is None:
            vocab = pa.array(self.vocabulary, type=values.type)
            lookup = self._arrow[values.type] = pc.SetLookupOptions(vocab)
        codes = pc.index_in(values, options=lookup)
        if codes.null_count:  # unseen or missing
            codes = pc.fill_null(codes, -1)
        return codes.to_numpy().astype(np.intp)

    def _object_codes(self, raw: pd.Series) -> np.ndarray:
        """Looking the values up as they are first and converting only the misses (numbers, say)
        gives the same codes as converting every value, without a string copy of the column per
        batch."""
        if self._index is None:
            self._index = pd.Index(self.vocabulary, dtype=object)
        values = raw.to_numpy(dtype=object)
        # An object Index as the target: a bare array would be inferred into an Arrow string
        # array first (a copy of every string, most of the cost of this step).
        codes = self._index.get_indexer(pd.Index(values, dtype=object, copy=False))
        for i in np.flatnonzero(codes < 0).tolist():
            value = values[i]
            if value is not None and not isinstance(value, str) and not pd.isna(value):
                codes[i] = self._index.get_indexer([str(value)])[0]
        return codes
