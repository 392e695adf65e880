"""Numeric categories meet their training category whatever the dtype on either side."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from anomaly.config import SchemaConfig
from anomaly.features.categories import CategoryLookup, category_text, fit_categories
from anomaly.features.preprocess import Preprocessor

SCHEMA = SchemaConfig(id_field="id", time_field=None, numeric=["x"], categorical=["mcc"])
CODES = [5411, 5812, 4111]


def training_from_csv(n: int = 300) -> pd.DataFrame:
    """Integer codes with one empty cell: pandas reads the column as float64."""
    rng = np.random.default_rng(0)
    rows = zip(rng.normal(size=n), rng.choice(CODES, n), strict=True)
    lines = ["x,mcc"] + [f"{x},{c}" for x, c in rows]
    lines[1] = lines[1].split(",")[0] + ","
    train = pd.read_csv(io.StringIO("\n".join(lines)))
    assert train["mcc"].dtype == np.float64
    return train


def probe(values: list, dtype: object) -> pd.DataFrame:
    return pd.DataFrame({"x": np.zeros(len(values)), "mcc": pd.Series(values, dtype=dtype)})


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (5411, "5411"),
        (5411.0, "5411"),
        (np.int32(5411), "5411"),
        (np.float32(5411.0), "5411"),
        (-0.0, "0"),
        (1e16, "10000000000000000"),
        (2.5, "2.5"),
        (True, "True"),
        (np.bool_(False), "False"),
        ("5411.0", "5411.0"),
    ],
)
def test_category_text_writes_integer_valued_numbers_as_integers(value, text):
    assert category_text(value) == text


def test_a_float_training_column_keeps_integer_texts():
    pre = Preprocessor(SCHEMA).fit(training_from_csv())
    assert pre.categories_ == {"mcc": ["4111", "5411", "5812"]}
    mixed = pd.Series([1, 1.0, True, "1", None], dtype=object)
    assert fit_categories(mixed, 5) == (["1", "True"], "1")  # the vocabulary, the most frequent


@pytest.mark.parametrize(
    "dtype", ["int64", "float64", "Int64", object, "str", "string[pyarrow]", "string[python]"]
)
def test_every_dtype_of_the_same_codes_meets_the_training_categories(dtype):
    """A stream decoder hands codes over as text ("5411"), a frame as ints or floats."""
    pre = Preprocessor(SCHEMA).fit(training_from_csv())
    values = [5411, 4111, 5812, 1234]
    if dtype in ("str", "string[pyarrow]", "string[python]"):
        values = [str(v) for v in values]
    codes = pre.category_codes(probe(values, dtype))[0]
    # 0-2 the training categories, 4 a category never seen (3 is a missing value).
    np.testing.assert_array_equal(codes, [1, 0, 2, 4])


def test_a_vocabulary_saved_with_float_texts_scores_as_before_and_meets_integers():
    """Bundles saved before ``category_text`` hold "5411.0": the float column they were trained
    on still meets it, and now so do the integers and texts of the same codes."""
    saved = Preprocessor(SCHEMA).fit(training_from_csv()).to_dict()
    del saved["impute_categories"]  # what the old fit kept: no imputed category...
    fitted = Preprocessor.from_dict(saved, SCHEMA)
    saved["categories"] = {"mcc": ["4111.0", "5411.0", "5812.0"]}  # ...and float texts
    old = Preprocessor.from_dict(saved, SCHEMA)
    assert old.feature_names_out_[1:4] == ["mcc=4111.0", "mcc=5411.0", "mcc=5812.0"]
    floats = probe([5411.0, 4111.0, np.nan, 1234.0], "float64")
    expected = fitted.transform(floats)
    np.testing.assert_array_equal(old.transform(floats), expected)
    for values, dtype in [
        ([5411, 4111, None, 1234], "Int64"),
        (["5411", "4111", None, "1234"], "str"),
        (["5411", "4111", None, "1234"], object),
        (["5411.0", "4111.0", None, "1234.0"], "str"),  # the text it held, still found
    ]:
        np.testing.assert_array_equal(old.transform(probe(values, dtype)), expected)


@pytest.mark.parametrize("dtype", ["str", object])
def test_an_integer_form_the_vocabulary_holds_is_not_aliased(dtype):
    lookup = CategoryLookup(["1", "1.0", "2.0", "x"])
    codes, _ = lookup.codes(pd.Series(["1", "1.0", "2", "2.0", "x", "3"], dtype=dtype))
    np.testing.assert_array_equal(codes, [0, 1, 2, 2, 3, -1])
    codes, _ = lookup.codes(pd.Series([1, 1.0, 2, 2.0, 3.5, None], dtype=object))
    np.testing.assert_array_equal(codes, [0, 0, 2, 2, -1, -1])
