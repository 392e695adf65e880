"""The k-th nearest-neighbour search shared by the knn members and the GAN."""

from __future__ import annotations

import pytest
import torch

from anomaly.estimator.detectors.neighbours import CHUNK_ROWS, GROUP, Neighbours, kth_smallest


@pytest.mark.parametrize("n", [1, 5, GROUP - 1, GROUP, 3 * GROUP + 7, 512, 1000, 2048, 2100])
@pytest.mark.parametrize("ties", [False, True])
def test_kth_smallest_is_the_kth_value_of_the_sorted_row(n: int, ties: bool) -> None:
    gen = torch.Generator().manual_seed(n)
    if ties:  # few distinct values: many equal minima across groups
        values = torch.randint(0, 7, (40, n), generator=gen).float()
    else:
        values = torch.randn(40, n, generator=gen)
    # Some rows with the k smallest values all in one group, or at the end (the columns left
    # over after the whole groups), where a selection by group minima could go wrong.
    values[0, :GROUP] -= 100.0
    values[1, -3:] -= 100.0
    values[2, torch.arange(0, n, 2)] = torch.inf  # leave-one-out masks are infinities too
    for k in range(1, min(n, 8) + 1):
        expected = torch.sort(values, dim=1).values[:, k - 1]
        assert torch.equal(kth_smallest(values, k), expected), (n, k)


def test_kth_distance_matches_brute_force_distances_with_and_without_own_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    n_reference, features = 1500, 6
    module = Neighbours(n_reference, features, k=3)
    module.reference.copy_(torch.randn(n_reference, features, generator=gen))
    # More rows than a chunk; the first rows are copies of reference rows (as calibration rows are).
    x = torch.randn(CHUNK_ROWS + 300, features, generator=gen)
    x[:200] = module.reference[:200]
    distances = torch.cdist(x.double(), module.reference.double())
    expected = torch.sort(distances, dim=1).values[:, 2]
    torch.testing.assert_close(module.kth_distance(x).double(), expected, atol=1e-4, rtol=1e-4)

    own = torch.full((len(x),), -1, dtype=torch.long)
    own[:200] = torch.arange(200)
    distances[torch.arange(200), torch.arange(200)] = torch.inf
    expected_loo = torch.sort(distances, dim=1).values[:, 2]
    got = module.kth_distance(x, own).double()
    torch.testing.assert_close(got, expected_loo, atol=1e-4, rtol=1e-4)
    assert (got[:200] > 0).all()  # the row's own copy (distance 0) was left out
