"""The knn member's cost per scored row, by reference rows and k (one core).

    python bench/knn_selection.py

Times ``Neighbours.distance`` (what ``BatchScorer`` runs for the knn members and the GAN's
search) on 8,192-row batches, 1,000-row micro-batches (the stream's under load) and 20-row
ones (light load), best of 9 after a warm-up call, for the reference sizes and k that the
detectors pick: 4,096 rows with k = 1 (from about 14,000 training rows on), k = 2 or 4 (5,000
training rows; 43 features is the fraud example's preprocessed width), 2,048 rows with k = 5,
and the GAN's 512-row search in 128 features. Beside each, the way it replaced (``previous``):
the product by ``addmm`` with the reference rows' norms as its bias, built on every call (the
same chunks and selection).

With FAISS importable (``pip install faiss-cpu``; not a dependency of the project), searches of
that maintained library run beside it on the same rows, one thread: ``faiss-flat``, its exact
flat L2 search, and for the knn members' sizes ``faiss-ivf``, an approximate inverted-file search
over 64 k-means cells that visits ``nprobe`` of them; each is printed with the share of rows it
scores as ``Neighbours.distance`` does (to 1e-5), 1.0 for an exact search.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anomaly.estimator.detectors.neighbours import GROUP, Neighbours, chunk_rows, k_smallest


def best_us_per_row(fn, x: torch.Tensor, repeat: int = 9) -> float:
    fn(x)  # warm-up: the first call pays for allocations and thread start
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return round(best / len(x) * 1e6, 2)


def previous_distance(module: Neighbours, x: torch.Tensor) -> torch.Tensor:
    """``module.distance`` as it was: ``|r|^2 - 2 x.r`` by ``addmm`` with the norms as its bias
    (one more pass over the rows x references block), the norms computed on every call."""
    ref = module.reference
    norms = (ref * ref).sum(1)
    pad = -len(ref) % GROUP
    ref = torch.cat([ref, ref.new_zeros(pad, ref.shape[1])])
    norms = torch.cat([norms, norms.new_full((pad,), torch.inf)])
    chunk_size = chunk_rows(len(module.reference))
    out = []
    for i in range(0, len(x), chunk_size):
        chunk = x[i : i + chunk_size]
        nearest = k_smallest(torch.addmm(norms, chunk, ref.T, alpha=-2.0), module.k)
        if module.method == "largest":
            nearest = nearest[:, -1:]
        out.append((nearest + (chunk * chunk).sum(1, keepdim=True)).clamp_min(0.0).sqrt().mean(1))
    return torch.cat(out)


def faiss_contenders(module: Neighbours, x: torch.Tensor) -> dict:
    """The FAISS searches for ``module``'s reference rows (empty without FAISS): label ->
    (search, share of ``x``'s rows it scores as ``module.distance`` does, to 1e-5)."""
    try:
        import faiss
    except ImportError:
        return {}
    faiss.omp_set_num_threads(1)
    ref = module.reference.numpy()
    k, features = module.k, ref.shape[1]
    exact = module.distance(x).numpy()

    def search(index):
        def run(rows: torch.Tensor) -> np.ndarray:
            squared, _ = index.search(rows.numpy(), k)
            nearest = np.sqrt(np.maximum(squared, 0.0))
            return nearest[:, -1] if module.method == "largest" else nearest.mean(1)

        return run

    def exact_share(run) -> float:
        return round(float(np.mean(np.abs(run(x) - exact) <= 1e-5 * np.maximum(exact, 1.0))), 3)

    flat = faiss.IndexFlatL2(features)
    flat.add(ref)
    out = {"faiss-flat": search(flat)}
    if len(ref) >= 2048:  # the knn members' sizes: 64 cells of 32-64 rows
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(features), features, 64)
        ivf.train(ref)
        ivf.add(ref)
        for nprobe in (2, 4, 8):
            copy = faiss.clone_index(ivf)
            copy.nprobe = nprobe
            out[f"faiss-ivf nprobe {nprobe}"] = search(copy)
    return {label: (run, exact_share(run)) for label, run in out.items()}


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    results = {}
    with torch.inference_mode():
        # (reference rows, k, features, method): the knn members' sizes (the mean of the k
        # nearest), and the GAN's search of 512 training rows in its discriminator's 128
        # features (the k-th).
        for n_reference, k, features, method in (
            (4096, 1, 30, "mean"),
            (4096, 2, 30, "mean"),
            (4096, 4, 43, "mean"),
            (2048, 5, 30, "mean"),
            (2000, 5, 43, "mean"),
            (512, 2, 128, "largest"),
        ):
            module = Neighbours(n_reference, features, k, method)
            module.reference.copy_(torch.randn(n_reference, features, generator=gen))
            for rows in (8192, 1000, 20):
                x = torch.randn(rows, features, generator=gen)
                torch.testing.assert_close(module.distance(x), previous_distance(module, x))
                name = f"{n_reference} rows, k={k}, {features} features, {rows}-row batch"
                contenders = {
                    "now": module.distance,
                    "previous": lambda x, m=module: previous_distance(m, x),
                }
                for label, (run, share) in faiss_contenders(module, x).items():
                    contenders[label] = run
                    results.setdefault(name, {})[f"{label} exact share"] = share
                for _ in range(2):  # alternating rounds: the machine drifts
                    for label, fn in contenders.items():
                        us = best_us_per_row(fn, x)
                        results.setdefault(name, {}).setdefault(label, []).append(us)
    print("us per row, one thread, two alternating rounds each")
    for name, times in results.items():
        print(f"{name}: " + ", ".join(f"{label} {value}" for label, value in times.items()))


if __name__ == "__main__":
    main()
