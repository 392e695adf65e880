"""The knn member's cost per scored row, by reference rows and k (one core, 30 features).

    python bench/knn_selection.py

Times ``Neighbours.distance`` (what ``BatchScorer`` runs for the knn member) on 8,192-row
batches, best of 9 after a warm-up call, for the reference sizes and k that ``KNNDetector``
picks: 2,048 rows with k = 1 (from about 7,000 training rows on) or k = 2 (5,000 training rows),
and the 1,024 rows of the earlier default, and the GAN's 512-row search in 128 features. Beside
each, the selection it replaced: for k = 1 ``min(1).values`` (which also finds the index), for
k > 1 ``topk`` over every reference row (``k_smallest`` now groups them first); and for k > 1
the mean of the k nearest distances (the knn members' score) beside the k-th (the GAN's).
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anomaly.estimator.detectors.neighbours import CHUNK_ROWS, Neighbours


def best_us_per_row(fn, x: torch.Tensor, repeat: int = 9) -> float:
    fn(x)  # warm-up: the first call pays for allocations and thread start
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return round(best / len(x) * 1e6, 2)


def replaced_selection(module: Neighbours, x: torch.Tensor, select) -> torch.Tensor:
    """``module.distance`` with the selection it replaced: ``select`` takes the rows x
    references block (``|r|^2 - 2 x.r``) and k, and returns each row's k-th smallest."""
    out = []
    for i in range(0, len(x), CHUNK_ROWS):
        chunk = x[i : i + CHUNK_ROWS]
        kth = select(module._partial(chunk), module.k)
        out.append((kth + (chunk * chunk).sum(1)).clamp_min(0.0).sqrt())
    return torch.cat(out)


def min_index(partial: torch.Tensor, k: int) -> torch.Tensor:
    """k = 1 as it was before ``amin``: ``min(1)``, which also finds the index."""
    return partial.min(1).values


def topk_over_all(partial: torch.Tensor, k: int) -> torch.Tensor:
    """k > 1 as it was before ``k_smallest`` grouped the columns: ``topk`` over all of them."""
    return torch.topk(partial, k, dim=1, largest=False).values[:, -1]


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    results = {}
    with torch.inference_mode():
        # (reference rows, k, features): the knn members' sizes, and the GAN's search of 512
        # training rows in its discriminator's 128 features.
        for n_reference, k, features in (
            (1024, 1, 30),
            (2048, 1, 30),
            (2048, 2, 30),
            (2048, 5, 30),
            (1500, 2, 30),
            (512, 2, 128),
        ):
            x = torch.randn(8192, features, generator=gen)
            module = Neighbours(n_reference, features, k)
            module.reference.copy_(torch.randn(n_reference, features, generator=gen))
            name = f"{n_reference} rows, k={k}, {features} features"
            results[name] = best_us_per_row(module.distance, x)
            if k > 1:  # the knn members' score: the mean of the k nearest distances
                mean = Neighbours(n_reference, features, k, method="mean")
                mean.reference.copy_(module.reference)
                results[f"{name}, mean of the k"] = best_us_per_row(mean.distance, x)
            label, select = (
                (f"{name}, min(1).values", min_index)
                if k == 1
                else (f"{name}, topk over all rows", topk_over_all)
            )
            results[label] = best_us_per_row(partial(replaced_selection, module, select=select), x)
    print(json.dumps({"us_per_row": results, "threads": 1}, indent=2))


if __name__ == "__main__":
    main()
