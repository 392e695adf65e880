from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from anomaly.config import SchemaConfig
from anomaly.errors import DataError
from anomaly.features.numeric import ConstantColumnWarning
from anomaly.features.preprocess import UNSEEN, Preprocessor

SCHEMA = SchemaConfig(
    id_field="id", time_field=None, numeric=["amount", "temp"], categorical=["kind"]
)


def frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "amount": np.exp(rng.normal(3, 1.5, n)),
            "temp": rng.normal(20, 2, n),
            "kind": rng.choice(["a", "b", "c"], n),
        }
    )


def test_heavy_tails_become_roughly_standard_and_far_values_stay_ordered():
    pre = Preprocessor(SCHEMA).fit(frame())
    x = pre.transform(frame(1000, seed=1))
    assert x.dtype == np.float32
    assert abs(float(np.median(x[:, 0]))) < 0.2
    assert 0.6 < float(np.std(x[:, 0])) < 1.5
    probe = frame(3)
    probe["amount"] = [1e3, 1e6, 1e12]  # beyond the training range: larger stays larger
    z = pre.transform(probe)[:, 0]
    assert np.all(np.isfinite(z)) and z[0] < z[1] < z[2] <= pre.clip


def test_numpy_input_names_columns_f0_to_fn():
    x = np.random.default_rng(0).normal(size=(100, 3))
    pre = Preprocessor().fit(x)
    assert pre.feature_names_in_ == ["f0", "f1", "f2"]
    assert pre.transform(x).shape == (100, 3)
    with pytest.raises(DataError, match="3"):
        pre.transform(x[:, :2])


def test_one_hot_with_unseen_bucket_and_imputed_missing():
    pre = Preprocessor(SCHEMA).fit(frame())
    assert pre.feature_names_out_[2:] == ["kind=a", "kind=b", "kind=c", f"kind={UNSEEN}"]
    probe = frame(3)
    probe["kind"] = ["a", "zzz", None]
    probe.loc[0, "temp"] = np.nan
    x = pre.transform(probe)
    # A category none of the 200 training rows showed is flagged by its rarity (p = 1/202, scaled
    # as an indicator: 1/sqrt(p(1-p)) = 14.25); a missing one, imputed, is not evidence: it
    # takes the most frequent training category, "b" (77 of 200), as a number takes the median.
    assert pre.impute_category_ == {"kind": "b"}
    flag = 1 / np.sqrt(1 / 202 * (1 - 1 / 202))
    np.testing.assert_allclose(x[:, 2:], [[1, 0, 0, 0], [0, 0, 0, flag], [0, 1, 0, 0]], rtol=1e-6)
    median_z = pre.transform(
        pd.DataFrame({"amount": [1.0], "temp": [pre.numeric_params_["temp"].median], "kind": ["a"]})
    )
    assert x[0, 1] == pytest.approx(median_z[0, 1])


def test_categories_are_compared_as_strings_whatever_the_column_dtype():
    train = frame()
    train["kind"] = np.random.default_rng(1).choice(["1", "2", "x"], len(train))
    pre = Preprocessor(SCHEMA).fit(train)
    probe = frame(6)
    # Numbers meet their string categories; NaN and None take the most frequent one ("x"),
    # unknown values go to the unseen bucket.
    probe["kind"] = pd.Series([1, "2", np.int64(2), None, np.nan, "y"], dtype=object)
    x = pre.transform(probe)[:, 2:]
    assert pre.feature_names_out_[2:] == ["kind=1", "kind=2", "kind=x", f"kind={UNSEEN}"]
    np.testing.assert_array_equal(x.argmax(1), [0, 1, 1, 2, 2, 3])
    # One value per row: 1, and for "y", never seen in training, the rarity flag.
    np.testing.assert_array_equal(np.count_nonzero(x, axis=1), [1] * 6)
    np.testing.assert_array_equal(x.max(1)[:5], [1] * 5)
    assert x[5, 3] == pre.unseen_value_["kind"] > 10
    as_text = probe.astype({"kind": "str"}).assign(kind=["1", "2", "2", "zz", "zz", "y"])
    # The same categories as text; what was missing above is now a value never seen.
    expected = x.copy()
    expected[3:5] = [0, 0, 0, pre.unseen_value_["kind"]]
    np.testing.assert_array_equal(pre.transform(as_text)[:, 2:], expected)


@pytest.mark.parametrize("dtype", ["str", "string[pyarrow]", "string[python]", object])
def test_category_codes_are_the_same_for_arrow_and_python_strings(dtype):
    """Arrow-held strings are looked up in Arrow, others through a pandas Index: one answer."""
    pre = Preprocessor(SCHEMA).fit(frame())
    values = ["c", "a", "zzz", None, "b", "", "a "]
    probe = frame(len(values)).assign(kind=pd.Series(values, dtype=dtype))
    codes = pre.category_codes(probe)[0]
    # 0-2 the training categories (a missing value imputed with "b", 1), 4 never seen (the
    # unseen bucket, flagged).
    np.testing.assert_array_equal(codes, [2, 0, 4, 1, 1, 4, 4])
    assert codes.dtype == np.intp


@pytest.mark.parametrize("dtype", ["str", "string[pyarrow]", object])
def test_validate_frame_finds_a_missing_category_under_reject_whatever_the_dtype(dtype):
    schema = SchemaConfig(
        numeric=["amount", "temp"], categorical=["kind"], missing="reject", time_field=None
    )
    pre = Preprocessor(schema).fit(frame())
    probe = frame(5).assign(kind=pd.Series(["a", "b", None, "c", "a"], dtype=dtype))
    assert pre.validate_frame(probe) == [(2, "missing_value", "field 'kind' is missing")]
    assert pre.validate_frame(frame(5).astype({"kind": dtype})) == []
    imputing = Preprocessor(SCHEMA).fit(frame())
    assert imputing.validate_frame(probe.assign(temp=np.nan)) == []


def test_reject_policy_names_row_and_column():
    schema = SchemaConfig(
        numeric=["amount", "temp"], categorical=["kind"], missing="reject", time_field=None
    )
    pre = Preprocessor(schema).fit(frame())
    probe = frame(5)
    probe.loc[3, "temp"] = np.nan
    with pytest.raises(DataError, match=r"column 'temp', row 3: value is missing"):
        pre.transform(probe)
    assert pre.validate_frame(probe) == [(3, "missing_value", "field 'temp' is missing")]


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda f: f.drop(columns=["temp"]), "missing column.*temp"),
        (lambda f: f.assign(extra=1), "unexpected column.*extra"),
        (
            lambda f: f.assign(temp=f["temp"].astype(object).where(f.index != 7, "hot")),
            "column 'temp', row 7: 'hot' is not a number",
        ),
        (
            lambda f: f.assign(amount=f["amount"].where(f.index != 4, np.inf)),
            "column 'amount', row 4: value is infinite",
        ),
        (lambda f: f.iloc[:0], "empty"),
        (lambda f: f.iloc[:5], "only 5 training records"),
    ],
)
def test_bad_training_input_is_named(mutate, pattern):
    with pytest.raises(DataError, match=pattern):
        Preprocessor(SCHEMA).fit(mutate(frame()))


def test_validate_frame_reports_each_bad_row_once():
    pre = Preprocessor(SCHEMA).fit(frame())
    probe = frame(6).astype({"temp": object})
    probe.loc[1, "temp"] = "warm"
    probe.loc[4, "amount"] = -np.inf
    probe.loc[5, "temp"] = np.nan  # imputed under the default policy: not an error
    errors = pre.validate_frame(probe)
    assert [(r, k) for r, k, _ in errors] == [(1, "not_a_number"), (4, "infinite")]
    assert "temp" in errors[0][2] and "amount" in errors[1][2]
    missing = pre.validate_frame(probe.drop(columns=["kind"]))
    assert len(missing) == 6 and all(k == "missing_column" and "kind" in m for _, k, m in missing)


def test_constant_column_warns_and_deviation_still_shows():
    f = frame()
    f["temp"] = 5.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre = Preprocessor(SCHEMA).fit(f)
    assert any(
        issubclass(w.category, ConstantColumnWarning) and "temp" in str(w.message) for w in caught
    )
    probe = frame(2)
    probe["temp"] = [5.0, 50.0]
    z = pre.transform(probe)[:, 1]
    assert z[0] == 0.0 and z[1] > 1.0


def test_a_value_a_constant_column_never_showed_counts_like_a_flag_training_never_raised():
    """A constant column's other values are as rare as a flag raised once or never in n training
    rows: a unit deviation lands about sqrt(n) out, where the indicator's rare value lands,
    instead of one ordinary standard deviation."""
    n = 300
    f = pd.DataFrame({"const": np.full(n, 5.0), "flag": np.r_[1.0, np.zeros(n - 1)]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantColumnWarning)
        pre = Preprocessor().fit(f)
    z = pre.transform(pd.DataFrame({"const": [5.0, 6.0, 4.0], "flag": [0.0, 1.0, 1.0]}))
    assert z[0, 0] == 0.0 and z[1, 0] == -z[2, 0]
    flag_z = z[1, 1] - z[0, 1]  # the indicator's rare value, raised once in training
    assert 0.9 * np.sqrt(n) < z[1, 0] < 1.1 * np.sqrt(n)
    assert abs(z[1, 0] - flag_z) < 0.1 * flag_z


def test_round_trip_through_dict_is_exact():
    pre = Preprocessor(SCHEMA).fit(frame())
    again = Preprocessor.from_dict(pre.to_dict(), SCHEMA)
    probe = frame(50, seed=3)
    np.testing.assert_array_equal(pre.transform(probe), again.transform(probe))


MIXED = SchemaConfig(
    id_field="id",
    time_field=None,
    numeric=["amount", "temp", "count", "flag", "const", "small"],
    categorical=["kind"],
)


def mixed_frame(n: int, seed: int) -> pd.DataFrame:
    """Float, int, bool and float32 columns: heavy tail, Gaussian, discrete, constant."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "amount": np.exp(rng.normal(3, 1.5, n)),
            "temp": rng.normal(20, 2, n),
            "count": rng.poisson(3, n),
            "flag": rng.random(n) < 0.3,
            "const": np.full(n, 5.0),
            "small": rng.normal(0, 1, n).astype(np.float32),
            "kind": rng.choice(["a", "b", "c"], n),
        }
    )


def as_objects(f: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Same values, object dtype: the numeric columns go through the per-column path."""
    return f.astype({c: object for c in columns})


@pytest.mark.parametrize("transform", ["quantile", "robust", "signed_log"])
def test_block_path_equals_the_per_column_path_bit_for_bit(transform):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantColumnWarning)
        pre = Preprocessor(MIXED, numeric_transform=transform).fit(mixed_frame(3000, 0))
    # More rows than one block step, not a multiple of it; new rows reach past the training
    # range on both sides (and past the clip), some are missing and imputed.
    probe = mixed_frame(5000, 1).set_index(np.arange(5000) * 3)
    rng = np.random.default_rng(2)
    for name, scale in [("amount", 1e4), ("temp", 50.0), ("small", 30.0)]:
        spread = probe[name] * rng.choice([1.0, scale, -scale], len(probe), p=[0.9, 0.05, 0.05])
        probe[name] = spread.where(rng.random(len(probe)) > 0.05, np.nan)
    probe.loc[probe.index[::7], "const"] = rng.normal(5, 1, len(probe.index[::7]))
    probe.loc[probe.index[:3], "amount"] = [1e300, -1e300, 0.0]
    slow = as_objects(probe, MIXED.numeric)
    nullable = probe.astype({"amount": "Float64"})  # a pandas extension dtype (with NA)
    assert pre._numeric_block(probe) is not None
    assert pre._numeric_block(slow) is None and pre._numeric_block(nullable) is None
    x = pre.transform(probe)
    np.testing.assert_array_equal(x, pre.transform(slow), strict=True)
    np.testing.assert_array_equal(x, pre.transform(nullable), strict=True)
    assert np.abs(x[:, :6]).max() == pre.clip  # the clip was reached
    # The other layouts the block path takes: one float64 block (the stream decoder's frame, and
    # numpy input, row-major) and a batch smaller than a block step.
    numeric = probe[MIXED.numeric].astype(float)
    for block in (
        numeric,
        pd.DataFrame(np.ascontiguousarray(numeric.to_numpy())).set_axis(MIXED.numeric, axis=1),
    ):
        block = block.assign(kind=probe["kind"].to_numpy())
        np.testing.assert_array_equal(pre.transform(block), x, strict=True)
    np.testing.assert_array_equal(pre.transform(probe.iloc[:100]), x[:100], strict=True)


def test_numpy_input_takes_the_block_path_and_matches_the_per_column_path():
    rows = np.random.default_rng(0).normal(size=(3000, 4)) ** 3
    pre = Preprocessor().fit(rows[:1000])
    frame = pd.DataFrame(rows, columns=pre.feature_names_in_)
    assert pre._numeric_block(frame) is not None
    np.testing.assert_array_equal(
        pre.transform(rows), pre.transform(as_objects(frame, pre.numeric_)), strict=True
    )


@pytest.mark.parametrize(
    ("missing", "bad", "expected"),
    [
        # The earlier column (numeric order) is named, whichever block step sees a value first;
        # within a column an infinite value is reported before a missing one, then the first row.
        (
            "impute",
            {(12, "temp"): np.inf, (4800, "amount"): np.nan, (4900, "amount"): -np.inf},
            "column 'amount', row 4890 (index 4900): value is infinite",
        ),
        (
            "reject",
            {(12, "temp"): np.inf, (4800, "amount"): np.nan, (4900, "amount"): -np.inf},
            "column 'amount', row 4890 (index 4900): value is infinite",
        ),
        (
            "reject",
            {(12, "temp"): np.inf, (4800, "amount"): np.nan, (4900, "amount"): np.nan},
            "column 'amount', row 4790 (index 4800): value is missing",
        ),
        (
            "impute",
            {(12, "temp"): np.inf, (4800, "amount"): np.nan, (3000, "temp"): np.nan},
            "column 'temp', row 2 (index 12): value is infinite",
        ),
        (
            "reject",
            {(3000, "temp"): np.nan, (4000, "temp"): np.inf},
            "column 'temp', row 3990 (index 4000): value is infinite",
        ),
    ],
)
def test_block_path_raises_the_per_column_paths_error(missing, bad, expected):
    schema = SchemaConfig(
        numeric=["amount", "temp"], categorical=["kind"], missing=missing, time_field=None
    )
    pre = Preprocessor(schema).fit(frame())
    probe = frame(5000).drop(columns=["id"]).set_index(np.arange(5000) + 10)
    for (label, name), value in bad.items():
        probe.loc[label, name] = value
    slow = as_objects(probe, ["amount", "temp"])
    assert pre._numeric_block(probe) is not None and pre._numeric_block(slow) is None
    for f in (probe, slow):
        with pytest.raises(DataError) as caught:
            pre.transform(f)
        assert str(caught.value) == expected


def test_transform_leaves_the_callers_array_untouched():
    """numpy input is wrapped without a copy: imputation and clipping must not write through."""
    rng = np.random.default_rng(3)
    train = rng.normal(size=(500, 4))
    pre = Preprocessor(numeric_transform="quantile").fit(train)
    rows = rng.normal(size=(50, 4))
    rows[3, 1] = np.nan
    rows[4, 2] = 1e9
    before = rows.copy()
    out = pre.transform(rows)
    np.testing.assert_array_equal(rows, before)
    assert np.isfinite(out).all() and out[4, 2] == pre.clip


def test_linear_view_replaces_quantile_columns_by_their_training_z_scores():
    """Quantile-mapped columns become (x - mean) / std of the training values (missing at the
    median, clipped as the rest); indicator, constant and one-hot columns stay as they are."""
    train = mixed_frame(500, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantColumnWarning)
        pre = Preprocessor(MIXED).fit(train)
    probe = mixed_frame(40, seed=1)
    probe.loc[3, "temp"] = np.nan
    probe.loc[4, "amount"] = 1e12
    xp, numeric = pre.transform_with_numeric(probe)
    view = pre.linear_view(xp, numeric)
    replaced = [MIXED.numeric.index(c) for c in ("amount", "temp", "count", "small")]
    assert pre.linear_plan().columns.tolist() == replaced
    kept = [i for i in range(xp.shape[1]) if i not in replaced]
    np.testing.assert_array_equal(view[:, kept], xp[:, kept])
    for name in ("amount", "temp", "count", "small"):
        values = train[name].to_numpy(dtype=np.float64)
        raw = probe[name].to_numpy(dtype=np.float64)
        raw = np.where(np.isnan(raw), np.median(values), raw)
        expected = np.clip((raw - values.mean()) / values.std(), -pre.clip, pre.clip)
        j = MIXED.numeric.index(name)
        np.testing.assert_allclose(view[:, j], expected, rtol=1e-6, atol=1e-6)
    assert view[4, 0] == pre.clip
    # The parameters travel with the preprocessor; ones saved without them cannot give the view.
    again = Preprocessor.from_dict(pre.to_dict(), MIXED)
    np.testing.assert_array_equal(again.linear_view(*again.transform_with_numeric(probe)), view)
    old = pre.to_dict()
    for params in old["numeric_params"].values():
        del params["mean"], params["std"]
    with pytest.raises(DataError, match="predate the linear view"):
        Preprocessor.from_dict(old, MIXED).linear_view(xp, numeric)


def test_non_text_column_labels_are_named_by_their_text():
    """A frame labelled 0, 1, 2 (pandas' default) is the features "0", "1", "2"."""
    x = np.random.default_rng(0).normal(size=(100, 3))
    by_number = pd.DataFrame(x)
    by_text = pd.DataFrame(x, columns=["0", "1", "2"])
    pre = Preprocessor().fit(by_number)
    assert pre.feature_names_in_ == ["0", "1", "2"]
    np.testing.assert_array_equal(pre.transform(by_number), pre.transform(by_text))
    np.testing.assert_array_equal(pre.transform(by_number), Preprocessor().fit_transform(by_text))
    assert pre.validate_frame(by_number.head(3)) == []
    with pytest.raises(DataError, match="column labels 0 and '0' are the same feature name"):
        Preprocessor().fit(by_number.assign(**{"0": 1.0}))


def test_a_missing_category_is_imputed_with_the_most_frequent_one_and_is_no_evidence():
    train = frame()
    train.loc[:9, "kind"] = None  # the only training rows outside the vocabulary
    pre = Preprocessor(SCHEMA).fit(train)
    assert pre.impute_category_ == {"kind": "b"}
    # The bucket took no training row, so a new category is flagged by its rarity.
    assert pre.unseen_value_["kind"] == pytest.approx(1 / np.sqrt(1 / 202 * (1 - 1 / 202)))
    probe = frame(2).assign(kind=[None, "b"])
    np.testing.assert_array_equal(pre.transform(probe)[:, 2:], [[0, 1, 0, 0]] * 2)
    round_trip = Preprocessor.from_dict(pre.to_dict(), SCHEMA)
    np.testing.assert_array_equal(round_trip.transform(probe), pre.transform(probe))


def test_a_category_never_present_in_training_keeps_missing_values_in_the_unseen_bucket():
    train = frame().assign(kind=None)
    pre = Preprocessor(SCHEMA).fit(train)
    assert pre.categories_ == {"kind": []} and pre.impute_category_ == {}
    np.testing.assert_array_equal(pre.transform(frame(1).assign(kind=None))[:, 2:], [[1]])
    rejecting = SchemaConfig(
        numeric=["amount", "temp"], categorical=["kind"], missing="reject", time_field=None
    )
    assert Preprocessor(rejecting).fit(frame()).impute_category_ == {}
