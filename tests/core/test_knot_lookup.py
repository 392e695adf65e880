"""KnotLookup must give np.interp's answer exactly (it only changes how the knot is found)."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.features.knot_lookup import KnotLookup, KnotLookupBlock, SortedSearch


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


def _mixed_lookups() -> list[KnotLookup]:
    """One lookup per test column plus ones that vary what the block must reconcile: raw and
    asinh grid domains, different grid sizes and windows, and a column with no grid."""
    rng = np.random.default_rng(11)
    lookups = []
    for name in sorted(COLUMNS):
        sample = COLUMNS[name](rng)
        knots, values = _knots_from(sample)
        lookups.append(KnotLookup(knots, values, float(np.median(sample)), float(np.std(sample))))
    few = np.sort(rng.normal(size=7))
    lookups.append(KnotLookup(few, np.arange(7.0), 0.0, 1.0))
    amounts = np.exp(1.5 * rng.normal(size=50_000) + 2.0)
    lookups.append(KnotLookup(*_knots_from(amounts), float(np.median(amounts)), 1.0))
    wild = np.sort(np.concatenate([[0.0], 10.0 ** np.linspace(-300, 300, 999)]))
    lookups.append(KnotLookup(wild, np.arange(len(wild), dtype=float), 0.0, 1e-300))
    return lookups


def _probes(lookup: KnotLookup, rng: np.random.Generator) -> np.ndarray:
    knots = lookup.knots
    inside = rng.uniform(knots[0], knots[-1], 3000) if np.isfinite(knots[-1] - knots[0]) else []
    return np.concatenate(
        [
            rng.choice(knots, 3000) * (1 + 1e-3 * rng.normal(size=3000)),
            inside,
            knots,
            (knots[1:] + knots[:-1]) / 2,
            np.nextafter(knots, np.inf),
            np.nextafter(knots, -np.inf),
            [knots[0] - 1e9, knots[-1] + 1e9, -np.inf, np.inf, np.nan, -0.0, 0.0],
        ]
    )


def test_block_equals_each_columns_lookup_bit_for_bit() -> None:
    lookups = _mixed_lookups()
    searches = [lk._search for lk in lookups if lk.use_grid]
    # The mix must cover what the block reconciles; otherwise the test proves less than it says.
    assert not all(lk.use_grid for lk in lookups)
    assert {s.asinh for s in searches} == {False, True}
    assert len({s.window for s in searches}) > 1 and len({s.size for s in searches}) > 1
    rng = np.random.default_rng(12)
    probes = [_probes(lk, rng) for lk in lookups]
    rows = max(len(p) for p in probes)
    # Each column's probes, repeated to the longest and shuffled, so columns mix in every row.
    x = np.stack([rng.permutation(np.resize(p, rows)) for p in probes], axis=1)
    for order in ("C", "F"):
        got = KnotLookupBlock(lookups)(np.asarray(x, order=order))
        for i, lk in enumerate(lookups):
            np.testing.assert_array_equal(got[:, i], lk(x[:, i]), strict=True)
    # Another column order (windows no longer sorted), a single row and no rows.
    order = rng.permutation(len(lookups))
    block = KnotLookupBlock([lookups[i] for i in order])
    got = block(x[:, order])
    for j, i in enumerate(order):
        np.testing.assert_array_equal(got[:, j], lookups[i](x[:, i]), strict=True)
    np.testing.assert_array_equal(block(x[:1, order]), got[:1], strict=True)
    assert block(x[:0, order]).shape == (0, len(lookups))


def test_block_of_columns_without_a_grid_is_np_interp() -> None:
    wild = np.sort(np.concatenate([[0.0], 10.0 ** np.linspace(-300, 300, 999)]))
    values = np.arange(len(wild), dtype=float)
    lookup = KnotLookup(wild, values, 0.0, 1e-300)
    assert not lookup.use_grid
    x = np.concatenate([wild, (wild[1:] + wild[:-1]) / 2, [np.nan, -np.inf, np.inf]])
    got = KnotLookupBlock([lookup, lookup])(np.stack([x, x[::-1]], axis=1))
    np.testing.assert_array_equal(got[:, 0], np.interp(x, wild, values), strict=True)
    np.testing.assert_array_equal(got[:, 1], np.interp(x[::-1], wild, values), strict=True)


# Knots closer together than ~1e-300: the segment slopes overflow to inf (0 * inf at the left knot
# was NaN, and a NaN scores as the most anomalous row). One set the grid serves, one it cannot
# (spread over 600 decades).
TINY_SEGMENT_KNOTS = {
    "subnormal_grid": np.array([0.0, 5e-324, 1e-323, 1e-310, 1e-310 + 1e-316, 0.5, 1.0]),
    "subnormal_no_grid": np.concatenate(
        [[0.0, 5e-324, 1e-323, 1e-310, 1e-310 + 1e-316], 10.0 ** np.linspace(-300, 300, 999)]
    ),
}


@pytest.mark.parametrize("name", sorted(TINY_SEGMENT_KNOTS))
def test_knots_closer_than_1e_300_give_finite_increasing_values(name: str) -> None:
    knots = TINY_SEGMENT_KNOTS[name]
    values = np.linspace(-3.0, 3.0, len(knots))
    lookup = KnotLookup(knots, values, center=0.5, scale=1.0)
    assert lookup.use_grid == (name == "subnormal_grid")
    x = np.sort(
        np.concatenate(
            [
                knots,
                np.nextafter(knots, np.inf),
                np.nextafter(knots, -np.inf),
                (knots[1:] + knots[:-1]) / 2,
                [knots[0] - 1.0, knots[-1] + 1.0, -np.inf, np.inf],
            ]
        )
    )
    got = lookup(x)
    assert np.isfinite(got).all()
    assert (np.diff(got) >= 0).all()  # monotone, as the quantile transform must be
    # np.interp's answer at every knot and outside the knots ...
    np.testing.assert_array_equal(lookup(knots), values, strict=True)
    np.testing.assert_array_equal(lookup(np.array([-np.inf, np.inf])), values[[0, -1]])
    # ... and wherever np.interp is finite (it gives inf strictly inside a segment whose slope
    # overflows; there the lookup holds the left knot's value).
    with np.errstate(over="ignore", invalid="ignore"):
        expected = np.interp(x, knots, values)
    finite = np.isfinite(expected)
    assert not finite.all()  # the probes do reach inside such a segment
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-12, atol=1e-12)
    # The block gives each column's answer.
    block = KnotLookupBlock([lookup, lookup])(np.stack([x, x[::-1]], axis=1))
    np.testing.assert_array_equal(block[:, 0], got, strict=True)
    np.testing.assert_array_equal(block[:, 1], got[::-1], strict=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sorted_search_of_values_that_asinh_rounds_together(side: str) -> None:
    # 0, 5e-324 and 1e-323 are distinct, but asinh((x - median) / 1) gives one number for all
    # three; the heavy tail makes the grid on that domain the one chosen, and it must still count
    # them apart.
    rng = np.random.default_rng(0)
    amounts = np.exp(1.5 * rng.normal(size=50_000) + 2.0)
    values = np.r_[[0.0, 5e-324, 1e-323], _knots_from(amounts)[0]]
    search = SortedSearch(values, side, center=float(np.median(amounts)), scale=1.0)
    assert search.use_grid and search.asinh
    x = np.concatenate([values, np.nextafter(values, np.inf), np.nextafter(values, -np.inf)])
    np.testing.assert_array_equal(search(x), np.searchsorted(values, x, side=side))
