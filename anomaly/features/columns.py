"""Reading records: a DataFrame (or a 2-D array named ``f0..fN``) and its feature columns as the
preprocessing wants them, with the per-row problems (text, infinity, missing values) named by row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from anomaly.errors import DataError


def to_frame(data: Any, feature_names: list[str] | None = None) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return text_labels(data)
    if isinstance(data, np.ndarray | list):
        arr = np.asarray(data)
        if arr.ndim == 1:
            arr = arr.reshape(-1, 1)
        if arr.ndim != 2:
            raise DataError(f"expected a 2-D array of records, got an array of shape {arr.shape}")
        names = feature_names or [f"f{i}" for i in range(arr.shape[1])]
        if len(names) != arr.shape[1]:
            raise DataError(
                f"array has {arr.shape[1]} columns but the model expects {len(names)} "
                f"({', '.join(names[:10])}{'...' if len(names) > 10 else ''})"
            )
        # A view of the caller's array, not a copy (~10 ms per 100k x 30 rows): nothing here
        # writes into the frames it builds.
        return pd.DataFrame(arr, columns=names, copy=False)
    raise DataError(f"expected a pandas DataFrame or a numpy array, got {type(data).__name__}")


def text_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its column labels as text (the schema and the bundle name features by
    text, so a label 0 is the feature "0"); the frame itself when they already are. A DataError
    where two labels become one text (0 and "0")."""
    labels = frame.columns
    if labels.inferred_type in ("string", "empty"):  # cached by pandas: no pass per batch
        return frame
    text = [str(label) for label in labels]
    seen: dict[str, object] = {}
    for label, name in zip(labels.tolist(), text, strict=True):
        if name in seen and labels.is_unique:  # (labels already repeated stay as they were)
            raise DataError(
                f"column labels {seen[name]!r} and {label!r} are the same feature name "
                f"{name!r}; rename one of them"
            )
        seen[name] = label
    return frame.set_axis(text, axis=1)


def numeric_column(frame: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Column as float64 and a mask of rows whose value was present but not a number."""
    col = frame[name]
    if pd.api.types.is_bool_dtype(col.dtype):
        return col.to_numpy(dtype=np.float64), np.zeros(len(col), dtype=bool)
    if pd.api.types.is_numeric_dtype(col.dtype):
        return col.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(len(col), dtype=bool)
    converted = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(converted) & col.notna().to_numpy()
    if bad.any():
        # Strings like "nan" or "inf" are parsed by to_numeric and handled as NaN/inf later.
        as_text = col[bad].astype(str).str.strip().str.lower()
        textual_nan = as_text.isin(["", "nan", "none", "null", "na"]).to_numpy()
        idx = np.flatnonzero(bad)
        bad[idx[textual_nan]] = False
    return converted, bad


def finite_or_missing_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A numeric column as floats (NaN where missing); DataError naming the first row that holds
    text or an infinite value."""
    values, bad = numeric_column(frame, name)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"column '{name}', {row_label(frame, pos)}: {frame[name].iloc[pos]!r} is not a number"
        )
    if np.isinf(values).any():
        raise bad_value(frame, name, np.isinf(values), "infinite")
    return values


def bad_value(frame: pd.DataFrame, name: str, mask: np.ndarray, what: str) -> DataError:
    """The DataError for the first row of ``mask`` in column ``name``: its value is ``what``."""
    pos = int(np.flatnonzero(mask)[0])
    return DataError(f"column '{name}', {row_label(frame, pos)}: value is {what}")


def arrow_strings(column: pd.Series) -> Any:
    """The Arrow data of a column of strings held by Arrow (pandas' ``str`` dtype with pyarrow,
    ``string[pyarrow]``), as one chunked array without a copy; None for any other column."""
    array = column.array
    if not isinstance(array, pd.arrays.ArrowStringArray):
        return None
    data = array.__arrow_array__()
    if not (pa.types.is_string(data.type) or pa.types.is_large_string(data.type)):
        return None
    return data


def row_label(frame: pd.DataFrame, pos: int) -> str:
    label = frame.index[pos]
    if isinstance(label, np.generic):  # pandas 2 hands out NumPy scalars: np.int64(4900)
        label = label.item()
    return f"row {pos}" if label == pos else f"row {pos} (index {label!r})"


# What ``row_problems`` says for each kind of problem.
PROBLEMS = {
    "not_a_number": "field '{name}': {value!r} is not a number",
    "infinite": "field '{name}': value is infinite",
    "missing_value": "field '{name}' is missing",
}


def row_problems(
    frame: pd.DataFrame, numeric: list[str], categorical: list[str], reject: bool
) -> list[tuple[int, str, str]]:
    """``Preprocessor.validate_frame``'s per-row problems of the feature columns, at most one per
    row (the first found, numeric columns first), in row order. ``reject``: a missing value is a
    problem too."""
    problems: dict[int, tuple[str, str]] = {}

    def add(mask: np.ndarray, kind: str, name: str) -> None:
        for pos in np.flatnonzero(mask).tolist():
            if pos not in problems:
                value = frame[name].iloc[pos]
                problems[pos] = (kind, PROBLEMS[kind].format(name=name, value=value))

    for name in numeric:
        values, bad = numeric_column(frame, name)
        add(bad, "not_a_number", name)
        add(np.isinf(values), "infinite", name)
        if reject:
            add(np.isnan(values) & ~bad, "missing_value", name)
    if reject:
        for name in categorical:
            add(frame[name].isna().to_numpy(), "missing_value", name)
    return [(pos, *problems[pos]) for pos in sorted(problems)]
