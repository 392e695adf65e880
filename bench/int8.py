"""Would int8 weights speed up the CPU scorer? torch's dynamic quantization of the VAE's and the
GAN's linear layers against the same fitted networks in fp32, in one process.

    python bench/int8.py [--rows 100000] [--features 30] [--rounds 7]

Fits the VAE and GAN detectors (their defaults, 300 steps: speed does not depend on how well they
are trained) on standard-normal rows with correlated columns, then times the scoring loop of
``decision_function`` on ``--rows`` fresh rows (batches of 8,192, 1 torch thread) for each
network as fitted and as
``torch.ao.quantization.quantize_dynamic(..., {nn.Linear}, torch.qint8)`` (int8 weights,
activations quantized per batch, fbgemm kernels), alternating rounds, best of ``--rounds``. Also
prints how far the int8 scores move: the largest relative change and the Spearman rank
correlation with the fp32 scores. The flow is left out: zuko's masked layers are not
``nn.Linear`` and dynamic quantization does not apply to them.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from anomaly.estimator.detectors.gan import GANDetector
    from anomaly.estimator.detectors.vae import VAEDetector

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(args.features, args.features)) / np.sqrt(args.features)
    train = (rng.normal(size=(20_000, args.features)) @ mixing).astype(np.float32)
    rows = (rng.normal(size=(args.rows, args.features)) @ mixing).astype(np.float32)

    print(f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}")
    for name, cls in (("vae", VAEDetector), ("gan", GANDetector)):
        fp32 = cls(max_steps=300, min_steps=0, seed=0).fit(train)
        int8 = copy.deepcopy(fp32)
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
            warnings.simplefilter("ignore")
            int8.module_ = torch.ao.quantization.quantize_dynamic(
                int8.module_, {torch.nn.Linear}, dtype=torch.qint8
            )
        best = {"fp32": float("inf"), "int8": float("inf")}
        for _ in range(args.rounds):
            for label, detector in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                scores(detector, rows)
                best[label] = min(best[label], time.perf_counter() - start)
        a, b = scores(fp32, rows), scores(int8, rows)
        change = float(np.max(np.abs(b - a) / np.maximum(np.abs(a), 1e-12)))
        rho = spearmanr(a, b).statistic
        print(
            f"{name}: fp32 {best['fp32'] * 1e3:6.1f} ms, int8 {best['int8'] * 1e3:6.1f} ms per "
            f"{args.rows:,} rows; int8 speed-up {best['fp32'] / best['int8']:.2f}x; "
            f"largest relative score change {change:.2g}, Spearman {rho:.5f}"
        )
    return 0


def scores(detector, rows):
    """``decision_function``'s loop (a quantized module has no float parameters to ask for
    its device, which ``decision_function`` does)."""
    import numpy as np
    import torch

    from anomaly.estimator.detectors._base import finite_scores

    with torch.inference_mode():
        return np.concatenate(
            [
                finite_scores(detector._score_tensor(torch.from_numpy(rows[i : i + 8192]))).numpy()
                for i in range(0, len(rows), 8192)
            ]
        )


if __name__ == "__main__":
    sys.exit(main())
