"""Categorical columns: the vocabulary kept from training and each value's position in it.

Values are compared as text, numbers in one form whatever their dtype (``category_text``): an
integer-valued number is written as an integer, so 5411, 5411.0 and np.int64(5411) are all
"5411". Without that, a column read as float64 for one empty cell in training (pandas has no
integer NaN) kept "5411.0", and a stream handing over the same codes as integers ("5411") hit
nothing but the unseen bucket. Strings are kept as they are.

Vocabularies saved before that form hold the float text ("5411.0"): such an entry is also found
by its integer form ("5411", as text or as a number) unless the vocabulary holds that form too,
so an old bundle's codes change only where it used to miss a value it had seen in training.

A value outside the vocabulary (unseen, cut by ``max_categories``, or missing) has position -1;
the preprocessor sends it to the column's ``__unseen__`` bucket.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from anomaly.features.columns import arrow_strings, bad_value


def category_text(value: Any) -> str:
    """The text a category is compared by: strings as they are, integer-valued numbers as
    integers ("5411" for 5411.0), booleans and other numbers as ``str`` writes them."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return str(value)  # not "1": True is a flag, as training's text "True" kept it
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return str(int(value))
    return str(value)


def fit_categories(column: pd.Series, max_categories: int) -> tuple[list[str], str | None]:
    """The vocabulary: the ``max_categories`` most frequent values of ``column`` as
    ``category_text`` (ties by name), sorted, so the one-hot layout is deterministic; and the
    most frequent category (ties by name; None when every value is missing), what a missing
    value is imputed with."""
    ordered = sorted(_counts(column).items(), key=lambda kv: (-kv[1], kv[0]))
    vocabulary = sorted(k for k, _ in ordered[:max_categories])
    return vocabulary, ordered[0][0] if ordered and max_categories > 0 else None


def fit_categorical(
    frame: pd.DataFrame, names: list[str], max_categories: int, impute: bool, rare: float
) -> tuple[dict[str, list[str]], dict[str, str], dict[str, float], dict[str, CategoryLookup]]:
    """Per categorical column: its vocabulary; under ``impute`` the category a missing value
    takes, its most frequent one (none for a column without any value: the unseen bucket takes
    it); and what a category training never showed sets in the unseen bucket: ``rare``, the
    rarity flag, where no training row fell in the bucket, else 1
    (``anomaly.features.preprocess``); and the lookups built on the way. A DataError names a
    missing value when not ``impute``."""
    vocabularies: dict[str, list[str]] = {}
    lookups: dict[str, CategoryLookup] = {}
    imputed: dict[str, str] = {}
    unseen: dict[str, float] = {}
    for name in names:
        column = frame[name]
        missing = column.isna().to_numpy()
        if not impute and missing.any():
            raise bad_value(frame, name, missing, "missing")
        vocabularies[name], mode = fit_categories(column, max_categories)
        if impute and mode is not None:
            imputed[name] = mode
        lookups[name] = CategoryLookup(vocabularies[name])
        in_bucket = lookups[name].codes(column)[0] < 0
        if name in imputed:  # missing values go to the imputed category
            in_bucket &= ~missing
        unseen[name] = 1.0 if in_bucket.any() else rare
    return vocabularies, imputed, unseen, lookups


def _counts(column: pd.Series) -> Counter[str]:
    """How many rows hold each ``category_text`` of ``column`` (missing values left out)."""
    present = column.dropna()
    if present.dtype == object:
        # Mixed objects: each value's own text (1, 1.0 and True hash alike in value_counts).
        counts: Counter[str] = Counter(present.map(category_text).tolist())
    else:
        # One dtype: equal values are equal texts, so count them first and convert the few keys.
        counts = Counter()
        for value, count in present.value_counts(sort=False).items():
            if count > 0:  # a pandas Categorical lists categories no row holds
                counts[category_text(value)] += int(count)
    return counts


def legacy_aliases(vocabulary: list[str]) -> dict[str, int]:
    """For each entry in the float text of an integer ("5411.0", "1e+16": what vocabularies
    saved before ``category_text`` hold), its integer form -> the entry's position, unless the
    vocabulary holds that form itself (module docstring)."""
    held = set(vocabulary)
    aliases: dict[str, int] = {}
    for i, entry in enumerate(vocabulary):
        try:
            number = float(entry)
        except ValueError:
            continue
        if math.isfinite(number) and number.is_integer() and str(number) == entry:
            text = str(int(number))
            if text not in held:
                aliases[text] = i
    return aliases


class CategoryLookup:
    """A column's vocabulary and the lookups built from it on first use (never saved)."""

    def __init__(self, vocabulary: list[str]) -> None:
        self.vocabulary = vocabulary
        aliases = legacy_aliases(vocabulary)
        # What is looked up (the vocabulary, then the aliases) and the position each stands for.
        self._keys = [*vocabulary, *aliases]
        self._positions = np.asarray(
            [*range(len(vocabulary)), *aliases.values(), -1], dtype=np.intp
        )
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
            keys = pa.array(self._keys, type=values.type)
            lookup = self._arrow[values.type] = pc.SetLookupOptions(keys)
        codes = pc.index_in(values, options=lookup)
        if codes.null_count:  # unseen or missing
            codes = pc.fill_null(codes, -1)
        return self._positions[np.asarray(codes.to_numpy(), dtype=np.intp)]

    def _object_codes(self, raw: pd.Series) -> np.ndarray:
        """Looking the values up as they are first and converting only the misses (numbers, say)
        gives the same codes as converting every value, without a string copy of the column per
        batch."""
        if self._index is None:
            self._index = pd.Index(self._keys, dtype=object)
        values = raw.to_numpy(dtype=object)
        # An object Index as the target: a bare array would be inferred into an Arrow string
        # array first (a copy of every string, most of the cost of this step).
        found = self._index.get_indexer(pd.Index(values, dtype=object, copy=False))
        misses = [
            i
            for i in np.flatnonzero(found < 0).tolist()
            if not isinstance(values[i], str) and not pd.isna(values[i])
        ]
        if misses:
            texts = [category_text(values[i]) for i in misses]
            found[misses] = self._index.get_indexer(pd.Index(texts, dtype=object))
        return self._positions[found]
