"""The k-nearest-neighbour search shared by the knn members and the GAN."""

from __future__ import annotations

import pytest
import torch

from anomaly.estimator.detectors.neighbours import (
    GROUP,
    ROUNDS_FROM_ROWS,
    Neighbours,
    chunk_rows,
    k_smallest,
)


@pytest.mark.parametrize("n", [1, 5, GROUP - 1, GROUP, 3 * GROUP + 7, 512, 1000, 2048, 2100])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rows", [40, ROUNDS_FROM_ROWS])  # both ways of selecting
def test_k_smallest_are_the_first_k_values_of_the_sorted_row(n: int, ties: bool, rows: int) -> None:
    gen = torch.Generator().manual_seed(n)
    if ties:  # few distinct values: many equal minima across groups
        values = torch.randint(0, 7, (rows, n), generator=gen).float()
    else:
        values = torch.randn(rows, n, generator=gen)
    # Some rows with the k smallest values all in one group, or at the end (the columns left
    # over after the whole groups), where a selection by group minima could go wrong.
    values[0, :GROUP] -= 100.0
    values[1, -3:] -= 100.0
    values[2, torch.arange(0, n, 2)] = torch.inf  # leave-one-out masks are infinities too
    for k in range(1, min(n, 8) + 1):
        expected = torch.sort(values, dim=1).values[:, :k]
        assert torch.equal(k_smallest(values.clone(), k), expected), (n, k)


@pytest.mark.parametrize("method", ["largest", "mean"])
def test_distance_matches_brute_force_distances_with_and_without_own_rows(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    n_reference, features = 1500, 6
    module = Neighbours(n_reference, features, k=3, method=method)
    module.reference.copy_(torch.randn(n_reference, features, generator=gen))
    # More rows than a chunk; the first rows are copies of reference rows (as calibration rows are).
    x = torch.randn(chunk_rows(n_reference) + 300, features, generator=gen)
    x[:200] = module.reference[:200]
    distances = torch.cdist(x.double(), module.reference.double())
    summary = (lambda d: d[:, 2]) if method == "largest" else (lambda d: d[:, :3].mean(1))
    expected = summary(torch.sort(distances, dim=1).values)
    # The mean takes in the copies' zero distances, which come back from float32's
    # |x|^2 - 2 x.r + |r|^2 as the square root of its rounding (a few 1e-4).
    atol = 1e-4 if method == "largest" else 1e-3
    torch.testing.assert_close(module.distance(x).double(), expected, atol=atol, rtol=1e-4)

    own = torch.full((len(x),), -1, dtype=torch.long)
    own[:200] = torch.arange(200)
    distances[torch.arange(200), torch.arange(200)] = torch.inf
    expected_loo = summary(torch.sort(distances, dim=1).values)
    got = module.distance(x, own).double()
    torch.testing.assert_close(got, expected_loo, atol=1e-4, rtol=1e-4)
    assert (got[:200] > 0).all()  # the row's own copy (distance 0) was left out


def test_a_new_reference_is_searched_after_the_first_search() -> None:
    # The reference side of the product is kept between calls: a write to the rows, or rows moved
    # to another tensor, must not leave the search on the old ones.
    gen = torch.Generator().manual_seed(1)
    module = Neighbours(100, 4, k=1)
    module.reference.copy_(torch.randn(100, 4, generator=gen))
    x = torch.randn(30, 4, generator=gen)

    def expected() -> torch.Tensor:
        return torch.cdist(x, module.reference).amin(1)

    torch.testing.assert_close(module.distance(x), expected(), atol=1e-4, rtol=1e-4)
    module.reference.copy_(torch.randn(100, 4, generator=gen) + 3.0)
    torch.testing.assert_close(module.distance(x), expected(), atol=1e-4, rtol=1e-4)
    module.to(torch.float64).to(torch.float32)  # a new reference tensor
    with torch.inference_mode():
        module.reference.mul_(2.0)  # an in-place write to a tensor made outside inference mode
    torch.testing.assert_close(module.distance(x), expected(), atol=1e-4, rtol=1e-4)
