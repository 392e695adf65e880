"""KnotLookup must give np.interp's answer exactly (it only changes how the knot is found)."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.knot_lookup import KnotLookup, SortedSearch


def _knots_from(sample: np.ndarray, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    knots = np.unique(np.quantile(sample, np.linspace(0, 1, n)))
    return knots, np.linspace(-3.0, 3.0, len(knots)) ** 3  # any increasing image


COLUMNS = {
    "gaussian": lambda rng: rng.normal(5.0, 2.0, 20_000),
    "lognormal_amounts": lambda rng: np.exp(1.5 * rng.normal(size=20_000) + 2.0),
    "pareto_both_tails": lambda rng: rng.standard_t(1.2, 20_000) * 1e3,
    "discrete_ties": lambda rng: rng.poisson(3.0, 20_000).astype(float),
    "clustered": lambda rng: np.concatenate([rng.normal(0, 1e-6, 10_000), rng.normal(1e6, 1, 10)]),
}


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_equals_np_interp_inside_and_outside_the_knots(name: str) -> None:
    rng = np.random.default_rng(7)
    sample = COLUMNS[name](rng)
    knots, values = _knots_from(sample)
    lookup = KnotLookup(knots, values, center=float(np.median(sample)), scale=float(np.std(sample)))
    # Fresh draws, the knots themselves, midpoints between knots and values beyond both ends.
    x = np.concatenate(
        [
            COLUMNS[name](np.random.default_rng(8)),
            knots,
            (knots[1:] + knots[:-1]) / 2,
            np.nextafter(knots, np.inf),
            np.nextafter(knots, -np.inf),
            [knots[0] - 1e9, knots[-1] + 1e9],
        ]
    )
    expected = np.interp(x, knots, values)
    np.testing.assert_allclose(lookup(x), expected, rtol=1e-12, atol=1e-12)


def test_grid_is_used_for_a_heavy_tailed_column_and_interp_kept_where_no_grid_helps() -> None:
    rng = np.random.default_rng(0)
    amounts = np.exp(1.5 * rng.normal(size=50_000) + 2.0)
    knots, values = _knots_from(amounts)
    assert KnotLookup(knots, values, float(np.median(amounts)), 1.0).use_grid
    # Knots spread over 600 decades: every grid cell but a few is empty, the rest hold hundreds.
    wild = np.sort(np.concatenate([[0.0], 10.0 ** np.linspace(-300, 300, 999)]))
    lookup = KnotLookup(wild, np.arange(len(wild), dtype=float), 0.0, 1e-300)
    assert not lookup.use_grid
    x = np.concatenate([wild, (wild[1:] + wild[:-1]) / 2])
    np.testing.assert_allclose(lookup(x), np.interp(x, wild, np.arange(len(wild))), rtol=1e-12)


def test_nan_stays_nan() -> None:
    knots = np.array([0.0, 1.0, 2.0])
    out = KnotLookup(knots, knots * 2, 1.0, 1.0)(np.array([np.nan, 0.5]))
    assert np.isnan(out[0]) and out[1] == 1.0


CALIBRATION_SCORES = {
    "continuous": lambda rng: rng.gamma(2.0, 3.0, 25_000),
    "heavy_tail": lambda rng: np.exp(rng.normal(3.0, 2.0, 25_000)),
    "ties": lambda rng: rng.integers(0, 40, 25_000).astype(float),
    "few": lambda rng: rng.normal(size=3),
    "one": lambda rng: np.array([1.5]),
}


@pytest.mark.parametrize("name", sorted(CALIBRATION_SCORES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_sorted_search_equals_np_searchsorted(name: str, side: str) -> None:
    values = np.sort(CALIBRATION_SCORES[name](np.random.default_rng(3)))
    search = SortedSearch(values, side, center=float(np.median(values)), scale=1.0)
    x = np.concatenate(
        [
            CALIBRATION_SCORES[name](np.random.default_rng(4)),
            values,
            np.nextafter(values, np.inf),
            np.nextafter(values, -np.inf),
            [-np.inf, np.inf, np.nan, values[0] - 1, values[-1] + 1],
        ]
    )
    np.testing.assert_array_equal(search(x), np.searchsorted(values, x, side=side))
