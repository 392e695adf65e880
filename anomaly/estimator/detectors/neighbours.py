"""The distance from a row to its k nearest reference rows, as a torch module.

Shared by the knn members (distances in the preprocessed space) and the GAN (distances in its
discriminator's last hidden layer). ``|x|^2 - 2 x.r + |r|^2`` is one matrix product per batch,
then the k smallest per row, summarised as the k-th of them (``method="largest"``) or their mean
(``"mean"``), the two forms PyOD's KNN calls by these names; the same code runs on the CPU and on
CUDA, and the reference rows are a buffer, so they travel with ``.to(device)`` and are saved with
the other tensors.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK_ROWS = 1024
GROUP = 64  # columns per group in ``k_smallest`` (32 and 128 were slower; below)
METHODS = ("largest", "mean")


class Neighbours(nn.Module):
    def __init__(self, n_reference: int, n_features: int, k: int, method: str = "largest") -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.register_buffer("reference", torch.zeros(n_reference, n_features))
        self.k = k
        self.method = method

    def _partial(self, x: torch.Tensor) -> torch.Tensor:
        """``|r|^2 - 2 x.r`` for every reference row ``r``: the squared distance less ``|x|^2``,
        which is the same for the whole row, so selections can skip it."""
        ref = self.reference.to(x.dtype)
        return torch.addmm((ref * ref).sum(1), x, ref.T, alpha=-2.0)

    def squared_distances(self, x: torch.Tensor) -> torch.Tensor:
        # Rounding can make a tiny squared distance negative: clamp at zero.
        return self._partial(x).add_((x * x).sum(1, keepdim=True)).clamp_min_(0.0)

    def distance(self, x: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        """Distance from each row to its k nearest reference rows: the k-th of them or their mean
        (``method``). ``own``, for rows that may themselves be reference rows, holds each row's
        reference index (-1: none), and that reference row is left out of its neighbours
        (leave-one-out)."""
        # On the CPU in chunks of rows, so that the rows x references block stays in the cache
        # between the product and the selection: 1,024 reference rows, 8,192-row batches, one
        # core, 3.45 -> 1.66 us/row (chunks of 2,048 rows: 1.70; 256: 2.01). A GPU wants the
        # whole batch in one kernel.
        x = x.float()
        if len(x) <= CHUNK_ROWS or x.device.type != "cpu":
            return self._distance(x, own)
        return torch.cat(
            [
                self._distance(
                    x[i : i + CHUNK_ROWS], None if own is None else own[i : i + CHUNK_ROWS]
                )
                for i in range(0, len(x), CHUNK_ROWS)
            ]
        )

    def _distance(self, x: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
        partial = self._partial(x)
        k = min(self.k, partial.shape[1])
        if own is not None:
            rows = torch.nonzero(own >= 0).squeeze(1)
            partial[rows, own[rows]] = torch.inf
            k = min(k, partial.shape[1] - 1)
        nearest = k_smallest(partial, k)
        if self.method == "largest":
            nearest = nearest[:, -1:]
        # |x|^2 added after the selection: one pass over k values per row, not over references.
        distances = (nearest + (x * x).sum(1, keepdim=True)).clamp_min(0.0).sqrt()
        return distances.mean(1)


def k_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest values of each row of ``values`` (rows x n), ascending (rows x k), exactly
    as ``torch.topk``.

    k = 1 is a minimum: bench/knn_selection.py, one core, 2,048 reference rows: amin 1.5 us/row
    in all, min(1).values (which also finds the index) 3.2-4.9, topk for k = 2 4.6-4.9.

    For k > 1, ``topk`` over all n columns is slow on the CPU (twice the matrix product at 2,048
    reference rows), so the columns are cut into groups of ``GROUP``, each group's minimum is
    taken (a cheap pass, like k = 1), and ``topk`` runs over the k groups with the smallest
    minima (plus the columns left over). Exact: if a group holding one of the k smallest values
    is not among those k groups, their k minima are themselves k values no larger than it, so
    every one of the k smallest is among the candidates (ties: the same values either way).
    bench/knn_selection.py, one core, 30 features, 8,192-row batches, product included, best of
    four runs each: 2,048 reference rows, k = 2, 2.7-3.2 us/row against 4.7-5.3 with ``topk``
    over every column; 1,500 rows, k = 2, 2.3-3.0 against 3.6-4.1. The selection alone, 1,024
    rows at a time: 2,048 columns 1.2 against 3.0-3.3 us/row for k = 2, 2.4 against 3.8 for
    k = 5; 512 columns (the GAN's search), k = 2: 0.6-0.8 against 0.9. With fewer than 3k
    groups it gained nothing (512 columns, k = 3-5: equal), so ``topk`` then takes every column.
    Groups of 32 or 128 columns were slower than 64.
    """
    if k == 1:
        return values.amin(1, keepdim=True)
    rows, n = values.shape
    grouped = n - n % GROUP
    if grouped // GROUP >= 3 * k:  # fewer groups leave too little to skip
        groups = values[:, :grouped].reshape(rows, grouped // GROUP, GROUP)
        best = groups.amin(2).topk(k, dim=1, largest=False, sorted=False).indices
        candidates = groups.gather(1, best.unsqueeze(2).expand(rows, k, GROUP))
        values = torch.cat([candidates.reshape(rows, k * GROUP), values[:, grouped:]], dim=1)
    return torch.topk(values, k, dim=1, largest=False, sorted=True).values
