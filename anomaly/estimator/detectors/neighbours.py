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

# Columns per group in ``k_smallest``: 32 and 128 were within the noise of 64 there (4,096 and
# 2,000 reference rows, k = 2-5; 128 slower for the GAN's 512 rows).
GROUP = 64
METHODS = ("largest", "mean")


def chunk_rows(n_reference: int) -> int:
    """Rows per chunk on the CPU: a rows x references block of about 2M values (8 MB), so that it
    stays in the cache between the product and the selection. ``distance`` with the chunk size
    varied (one core, 8,192-row batches, k = 1, two runs), us/row for chunks of 256 / 512 /
    1,024 / 2,048 rows: 4,096 reference rows in 30 features 3.3-3.5 / 3.1-3.3 / 3.7 / 10.2;
    2,048 rows 1.7 / 1.6 / 1.5-1.6 / 1.9; the GAN's 512 rows in 128 features 1.6 / 1.5 / 1.5 /
    1.4-1.7 (and, earlier, 1,024 reference rows: 3.45 unchunked, 1.66 in chunks of 1,024)."""
    return min(1024, max(256, (1 << 21) // max(n_reference, 1)))


class Neighbours(nn.Module):
    def __init__(self, n_reference: int, n_features: int, k: int, method: str = "largest") -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.register_buffer("reference", torch.zeros(n_reference, n_features))
        self.k = k
        self.method = method
        # (reference tensor, its version, its terms): ``_terms``.
        self._cached_terms: tuple[torch.Tensor, int | None, torch.Tensor] | None = None

    def _terms(self, dtype: torch.dtype) -> torch.Tensor:
        """The reference side of the product as one matrix, references x (features + 1): each
        row ``[-2 r, |r|^2]``, so that ``[x, 1]`` times it is ``|r|^2 - 2 x.r`` in one product
        with no separate pass to add the norms (``addmm``'s bias is one more write and read of
        the rows x references block). Zero rows with ``|r|^2 = inf`` pad the references to a
        multiple of ``GROUP``: their columns of the product are infinite, never near.

        bench/knn_selection.py (one core, a Xeon with AVX512, us/row, against ``addmm`` with the
        norms built on every call; the scores came out bit for bit the same): 4,096 reference
        rows, k = 1, 8,192-row batches 2.4 against 3.1, 20-row batches 3.9-4.2 against 7.4; k = 4
        in 43 features 4.4 against 5.1; 2,048 rows, k = 5, 2.8 against 3.1; the GAN's 512 rows in
        128 features 1.4 against 1.4 (20-row batches 3.6 against 4.3-4.9).

        Kept between calls (building it cost 37 us a call, a third of a 20-row search) for as
        long as the reference tensor is the same object at the same version (an in-place write
        to a tensor made outside inference mode moves its version; the members write theirs
        once, when fit or loaded), and made outside inference mode, so that a product that
        records gradients may read it too."""
        ref = self.reference
        version = None if ref.is_inference() else ref._version
        cached = self._cached_terms
        if cached is not None and cached[0] is ref and cached[1] == version:
            terms = cached[2]
        else:
            with torch.inference_mode(False), torch.no_grad():
                n, features = ref.shape
                terms = ref.new_zeros(n + (-n % GROUP), features + 1)
                terms[:n, :features] = ref * -2.0
                terms[:n, features] = (ref * ref).sum(1)
                terms[n:, features] = torch.inf
            self._cached_terms = (ref, version, terms)
        return terms.to(dtype)

    @staticmethod
    def _with_ones(x: torch.Tensor) -> torch.Tensor:
        """``[x, 1]``: the rows' side of the product."""
        return torch.cat([x, x.new_ones(len(x), 1)], 1)

    def squared_distances(self, x: torch.Tensor) -> torch.Tensor:
        # Rounding can make a tiny squared distance negative: clamp at zero.
        partial = self._with_ones(x) @ self._terms(x.dtype).T[:, : len(self.reference)]
        return partial.add_((x * x).sum(1, keepdim=True)).clamp_min_(0.0)

    def distance(self, x: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        """Distance from each row to its k nearest reference rows: the k-th of them or their mean
        (``method``). ``own``, for rows that may themselves be reference rows, holds each row's
        reference index (-1: none), and that reference row is left out of its neighbours
        (leave-one-out)."""
        x = x.float()
        x_ones, terms = self._with_ones(x), self._terms(x.dtype).T
        # On the CPU in chunks of rows (``chunk_rows``); a GPU wants the whole batch in one kernel.
        chunk = chunk_rows(len(self.reference))
        if len(x) <= chunk or x.device.type != "cpu":
            return self._distance(x, x_ones, own, terms)
        return torch.cat(
            [
                self._distance(
                    x[i : i + chunk],
                    x_ones[i : i + chunk],
                    None if own is None else own[i : i + chunk],
                    terms,
                )
                for i in range(0, len(x), chunk)
            ]
        )

    def _distance(
        self, x: torch.Tensor, x_ones: torch.Tensor, own: torch.Tensor | None, terms: torch.Tensor
    ) -> torch.Tensor:
        # |r|^2 - 2 x.r: the squared distance less |x|^2, which is the same for the whole row,
        # so the selection can skip it.
        partial = x_ones @ terms
        n = len(self.reference)
        k = min(self.k, n)
        if own is not None:
            rows = torch.nonzero(own >= 0).squeeze(1)
            partial[rows, own[rows]] = torch.inf
            k = min(k, n - 1)
        nearest = k_smallest(partial, k)
        if self.method == "largest":
            nearest = nearest[:, -1:]
        # |x|^2 added after the selection: one pass over k values per row, not over references.
        distances = (nearest + (x * x).sum(1, keepdim=True)).clamp_min(0.0).sqrt()
        return distances.mean(1)


# From this many rows on, ``k_smallest`` takes the k in rounds; below, ``topk`` over the best
# groups, which has fewer steps (docstring).
ROUNDS_FROM_ROWS = 256


def k_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest values of each row of ``values`` (rows x n), ascending (rows x k), exactly
    as ``torch.topk``. ``values`` may be overwritten (the callers' product is scratch).

    k = 1 is a minimum: bench/knn_selection.py, one core, 2,048 reference rows: amin 1.5 us/row
    in all, min(1).values (which also finds the index) 3.2-4.9, topk for k = 2 4.6-4.9.

    For k > 1, ``topk`` over every column is slow on the CPU (twice the matrix product at 2,048
    reference rows), so the columns are cut into groups of ``GROUP`` (infinities pad the last)
    and each group's minimum is taken in one pass. Then, for ``ROUNDS_FROM_ROWS`` rows or more,
    k rounds work on the groups alone (``_k_rounds``); for fewer rows, where each torch call's
    fixed cost counts more than the rows' work, ``topk`` runs over the columns of the k groups
    with the smallest minima (``_k_best_groups``: five calls in all, against seven per round).

    bench/knn_selection.py (one core, product and chunks included, us/row, two rounds each,
    the rounds against the best groups in chunks of 1,024 rows, the way before): 4,096 reference
    rows in 30 features, k = 2, 8,192-row batches 4.3-4.7 against 6.0-12.5, 1,000-row batches
    4.1-4.2 against 5.8-6.0; 43 features (the fraud example's width), k = 4, 6.3-6.6 against
    8.1-10.0; 2,000 rows, k = 5, 3.7-3.8 against 4.9; the GAN's 512 rows in 128 features, k = 2,
    1.8 against 2.2. The selection alone, us per call, rounds against best groups (4,096
    columns k = 2 / k = 4, 2,048 columns k = 5): 20 rows 57 / 113 / 129 against 38 / 53 / 48;
    128 rows 182 / 222 / 230 against 142 / 208 / 206; 256 rows 219 / 452 / 389 against 262 /
    423 / 402; 384 rows 369 / 665 / 588 against 460 / 919 / 797.
    """
    if k == 1:
        return values.amin(1, keepdim=True)
    rows, n = values.shape
    if n % GROUP:
        values = torch.cat([values, values.new_full((rows, -n % GROUP), torch.inf)], 1)
    groups = values.view(rows, -1, GROUP)
    minima = groups.amin(2)
    if rows >= ROUNDS_FROM_ROWS:
        return _k_rounds(groups, minima, k)
    return _k_best_groups(groups, minima, k)


def _k_rounds(groups: torch.Tensor, minima: torch.Tensor, k: int) -> torch.Tensor:
    """Each round, the smallest group minimum is the next value out; that one entry is set to
    infinity and its group's minimum taken again. One entry leaves per round, so ties count as
    often as ``topk`` counts them."""
    rows = len(groups)
    row = torch.arange(rows, device=groups.device)
    out = groups.new_empty(rows, k)
    for j in range(k):
        out[:, j], group = minima.min(1)
        if j == k - 1:
            break
        members = groups[row, group]  # each row's group that gave the value: a rows x GROUP copy
        taken = members.argmin(1)
        members[row, taken] = torch.inf
        groups[row, group, taken] = torch.inf
        minima[row, group] = members.amin(1)
    return out


def _k_best_groups(groups: torch.Tensor, minima: torch.Tensor, k: int) -> torch.Tensor:
    """``topk`` over the k groups with the smallest minima. Exact: if a group holding one of the
    k smallest values is not among them, their k minima are k values no larger than it, so every
    one of the k smallest is a candidate (ties: the same values either way)."""
    rows, n_groups, _ = groups.shape
    if n_groups > k:
        best = minima.topk(k, dim=1, largest=False, sorted=False).indices
        groups = groups.gather(1, best.unsqueeze(2).expand(rows, k, GROUP))
    return torch.topk(groups.reshape(rows, -1), k, dim=1, largest=False, sorted=True).values
