"""The device scoring path (torch ops for the per-row steps, used on CUDA) run on the CPU: it must
give exactly what the numpy path gives, so a GPU run differs from the CPU only by the networks'
and transcendental functions' rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from anomaly.errors import DataError
from anomaly.features.preprocess import Preprocessor
from anomaly.scoring.device_scoring import DevicePreprocessor, host_inputs
from anomaly.scoring.scorer import BatchScorer

from .conftest import SCHEMA


def awkward_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows beyond every knot on both sides, missing values, unseen and missing categories."""
    rows = frame.copy()
    rows.loc[0, "amount"] = 1e12
    rows.loc[1, "amount"] = -5.0
    rows.loc[2, "f0"] = -1e6
    rows.loc[3, "f1"] = np.nan
    rows.loc[4, "merchant"] = "never-seen"
    rows.loc[5, "merchant"] = None
    rows.loc[6, "f2"] = rows["f2"].median()  # exactly the imputed value
    return rows


@pytest.mark.parametrize("kind", ["quantile", "robust", "signed_log"])
def test_device_preprocessing_equals_the_host_transform(frame_problem, kind):
    train, normal, anomalous = frame_problem
    pre = Preprocessor(schema=SCHEMA, numeric_transform=kind, n_quantiles=200).fit(train)
    rows = awkward_rows(pd.concat([normal, anomalous], ignore_index=True))
    # Knots themselves and their neighbours: the places a search can be off by one.
    knots = np.asarray(pre.numeric_params_["f3"].knots)
    rows["f3"] = rows["f3"].astype(np.float64)
    rows.loc[10 : 10 + 2 * len(knots) - 1, "f3"] = np.r_[knots, np.nextafter(knots, np.inf)][
        : len(rows) - 10
    ]
    values, codes = host_inputs(pre, rows)
    device = DevicePreprocessor(pre, torch.device("cpu"))
    got = device.transform(torch.from_numpy(values), [torch.from_numpy(c) for c in codes])
    np.testing.assert_array_equal(got.numpy(), pre.transform(rows))
    # The never-seen category is flagged by its rarity; the missing one takes the most frequent
    # training category (``impute``), not the bucket.
    bucket = got[:, pre.feature_names_out_.index("merchant=__unseen__")]
    assert bucket[4] == pre.unseen_value_["merchant"] > 1 and bucket[5] == 0
    imputed = pre.impute_category_["merchant"]
    assert got[5, pre.feature_names_out_.index(f"merchant={imputed}")] == 1


def test_device_steps_score_exactly_like_the_numpy_steps(fitted_model, frame_problem):
    _, normal, anomalous = frame_problem
    rows = awkward_rows(pd.concat([normal, anomalous], ignore_index=True))
    host = BatchScorer(fitted_model, device="cpu", batch_size=256).score(rows)
    device = BatchScorer(fitted_model, device="cpu", batch_size=256, device_steps=True)
    assert device._device_scorer is not None
    got = device.score(rows)
    assert host.is_alert.sum() >= 50  # the anomalies, so explanations are compared too
    # The ensemble score is the mean of -log10(p): numpy's and torch's log10 may round the last
    # bit differently (they agree on an Intel Xeon, not on an AMD EPYC). Everything else, the
    # ensemble's p-values, alerts and severities included, must be exact.
    np.testing.assert_allclose(
        got.columns["ensemble"], host.columns["ensemble"], rtol=1e-14, atol=0
    )
    got.scores["ensemble"] = got.columns["ensemble"] = host.columns["ensemble"]
    for field in dataclasses.fields(host):
        a, b = getattr(host, field.name), getattr(got, field.name)
        if isinstance(a, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        elif isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        elif isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a == b, field.name


def test_device_steps_raise_the_host_errors(fitted_model, frame_problem):
    rows = frame_problem[1].head(20).copy()
    rows["f4"] = rows["f4"].astype(object)
    rows.loc[7, "f4"] = "broken"
    device = BatchScorer(fitted_model, device="cpu", device_steps=True)
    with pytest.raises(DataError, match=r"column 'f4', row 7: 'broken' is not a number"):
        device.score(rows)
    rows = frame_problem[1].head(20).copy()
    rows.loc[3, "amount"] = np.inf
    with pytest.raises(DataError, match=r"column 'amount', row 3: value is infinite"):
        device.score(rows)
    with pytest.raises(DataError, match=r"missing column.*merchant"):
        device.score(rows.drop(columns=["merchant"]))


def test_device_steps_handle_an_empty_batch_and_a_model_without_categories(frame_problem):
    from anomaly import AnomalyModel

    train = frame_problem[0][SCHEMA.numeric].to_numpy()
    model = AnomalyModel(
        target_fpr=0.01, seed=0, device="cpu", detectors=["vae", "gan"], max_epochs=2
    ).fit(train)
    rows = frame_problem[2][SCHEMA.numeric].to_numpy()
    host = BatchScorer(model, device="cpu").score(rows)
    got = BatchScorer(model, device="cpu", device_steps=True).score(rows)
    # The ensemble's last bit as in the test above; every other column exactly.
    np.testing.assert_allclose(got.scores["ensemble"], host.scores["ensemble"], rtol=1e-14, atol=0)
    pd.testing.assert_frame_equal(
        host.scores.drop(columns="ensemble"), got.scores.drop(columns="ensemble"), check_exact=True
    )
    assert got.scores["flow"].isna().all()
    assert len(BatchScorer(model, device="cpu", device_steps=True).score(rows[:0])) == 0


@pytest.mark.gpu
def test_device_preprocessing_on_cuda_matches_the_host(frame_problem):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    train, normal, anomalous = frame_problem
    pre = Preprocessor(schema=SCHEMA).fit(train)
    rows = awkward_rows(pd.concat([normal, anomalous], ignore_index=True))
    values, codes = host_inputs(pre, rows)
    device = DevicePreprocessor(pre, torch.device("cuda"))
    got = device.transform(
        torch.from_numpy(values).cuda(), [torch.from_numpy(c).cuda() for c in codes]
    )
    # Searches and interpolation are exact; only log1p in the tails may round differently.
    np.testing.assert_allclose(got.cpu().numpy(), pre.transform(rows), rtol=1e-6, atol=1e-6)


def test_device_preprocessing_of_subnormal_knots_is_finite_and_equals_the_host(frame_problem):
    """Knots closer than ~1e-300 overflow the segment slope; both paths must give the same
    finite values (see anomaly.features.knot_lookup.segment_slopes)."""
    train, normal, _ = frame_problem
    train = train.copy()
    tiny = np.array([0.0, 5e-324, 1e-323, 1e-310])
    train["f3"] = np.r_[np.repeat(tiny, 100), np.linspace(0.1, 1.0, len(train) - 400)]
    pre = Preprocessor(schema=SCHEMA, numeric_transform="quantile", n_quantiles=200).fit(train)
    knots = np.asarray(pre.numeric_params_["f3"].knots)
    assert set(tiny) <= set(knots)
    rows = normal.copy()
    probes = np.r_[knots, np.nextafter(knots, np.inf), [5e-311]][: len(rows)]
    rows["f3"] = np.resize(probes, len(rows))
    values, codes = host_inputs(pre, rows)
    device = DevicePreprocessor(pre, torch.device("cpu"))
    got = device.transform(torch.from_numpy(values), [torch.from_numpy(c) for c in codes])
    host = pre.transform(rows)
    assert np.isfinite(host).all()
    np.testing.assert_array_equal(got.numpy(), host)
