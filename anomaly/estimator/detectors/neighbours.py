"""The k-th nearest-neighbour distance to a set of reference rows, as a torch module.

Shared by the knn members (distances in the preprocessed space) and the GAN (distances in its
discriminator's last hidden layer). ``|x|^2 - 2 x.r + |r|^2`` is one matrix product per batch,
then the k smallest per row; the same code runs on the CPU and on CUDA, and the reference rows are
a buffer, so they travel with ``.to(device)`` and are saved with the other tensors.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK_ROWS = 1024


class Neighbours(nn.Module):
    def __init__(self, n_reference: int, n_features: int, k: int) -> None:
        super().__init__()
        self.register_buffer("reference", torch.zeros(n_reference, n_features))
        self.k = k

    def _partial(self, x: torch.Tensor) -> torch.Tensor:
        """``|r|^2 - 2 x.r`` for every reference row ``r``: the squared distance less ``|x|^2``,
        which is the same for the whole row, so selections can skip it."""
        ref = self.reference.to(x.dtype)
        return torch.addmm((ref * ref).sum(1), x, ref.T, alpha=-2.0)

    def squared_distances(self, x: torch.Tensor) -> torch.Tensor:
        # Rounding can make a tiny squared distance negative: clamp at zero.
        return self._partial(x).add_((x * x).sum(1, keepdim=True)).clamp_min_(0.0)

    def kth_distance(self, x: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        """Distance from each row to its k-th nearest reference row. ``own``, for rows that may
        themselves be reference rows, holds each row's reference index (-1: none), and that
        reference row is left out of its neighbours (leave-one-out)."""
        # On the CPU in chunks of rows, so that the rows x references block stays in the cache
        # between the product and the selection: 1,024 reference rows, 8,192-row batches, one
        # core, 3.45 -> 1.66 us/row (chunks of 2,048 rows: 1.70; 256: 2.01). A GPU wants the
        # whole batch in one kernel.
        x = x.float()
        if len(x) <= CHUNK_ROWS or x.device.type != "cpu":
            return self._kth(x, own)
        return torch.cat(
            [
                self._kth(x[i : i + CHUNK_ROWS], None if own is None else own[i : i + CHUNK_ROWS])
                for i in range(0, len(x), CHUNK_ROWS)
            ]
        )

    def _kth(self, x: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
        partial = self._partial(x)
        k = min(self.k, partial.shape[1])
        if own is not None:
            rows = torch.nonzero(own >= 0).squeeze(1)
            partial[rows, own[rows]] = torch.inf
            k = min(k, partial.shape[1] - 1)
        if k == 1:
            # bench/knn_selection.py, one core, 2,048 reference rows: amin 1.5 us/row in all,
            # min(1).values (which also finds the index) 3.2-4.9, topk for k = 2 4.6-4.9.
            kth = partial.amin(1)
        else:
            kth = torch.topk(partial, k, dim=1, largest=False, sorted=True).values[:, -1]
        # |x|^2 added after the selection: one pass over the rows, not over rows x references.
        return (kth + (x * x).sum(1)).clamp_min(0.0).sqrt()
