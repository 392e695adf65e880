"""Rows/s of the scoring step alone, on a device: the streams issue's GPU figure (goal >= 20M
rows/s for 30 features on a GPU).

    python bench/scoring_step.py --device cuda --rows 2000000 --features 30
    python bench/scoring_step.py --device cpu --rows 100000      (the same on the CPU)

Fits the default model (VAE + flow + GAN) on ``--fit-rows`` generated rows (on the CPU), then
times, on the same ``--rows`` fresh rows in one process (best of ``--repeat``):

- ``score_host_steps``: ``BatchScorer.score`` with the per-row steps around the networks in
  numpy on the host (the CPU default; the baseline of the ratio);
- ``score_device_steps``: ``BatchScorer.score`` with those steps as torch ops on the device (the
  CUDA default): what the service calls per micro-batch, from a numeric array in to alerts,
  severities and explanations out;
- ``device_pass``: the device part of that alone, from the validated float64 block on the host to
  the score table back on the host (copies both ways included);
- ``networks``: the three networks alone on rows already on the device.

Each with bf16 autocast too where ``--bf16``. ``torch.cuda.synchronize`` ends every timed call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import make_rows


def best_rate(fn, rows: int, repeat: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return rows / best


def measure(model, device: torch.device, rows: np.ndarray, args, bf16: bool, sync) -> dict:
    from anomaly.features.columns import to_frame
    from anomaly.scoring.device_scoring import DeviceScorer, host_inputs
    from anomaly.scoring.scorer import BatchScorer

    tag = "_bf16" if bf16 else ""
    out = {}
    kwargs = dict(device=str(device), batch_size=args.batch_size, threads=args.threads, bf16=bf16)
    host = BatchScorer(model, device_steps=False, **kwargs)
    out[f"score_host_steps{tag}_rows_per_s"] = best_rate(
        lambda: host.score(rows), len(rows), args.repeat, sync
    )
    dev = BatchScorer(model, device_steps=True, **kwargs)
    out[f"score_device_steps{tag}_rows_per_s"] = best_rate(
        lambda: dev.score(rows), len(rows), args.repeat, sync
    )
    frame = to_frame(rows, model.preprocessor_.feature_names_in_)
    values, codes = host_inputs(model.preprocessor_, frame)
    scorer = DeviceScorer(model, device)
    out[f"device_pass{tag}_rows_per_s"] = best_rate(
        lambda: scorer.score(values, codes, args.batch_size, bf16), len(rows), args.repeat, sync
    )
    xp = torch.from_numpy(model.transform(rows)).to(device)

    def networks() -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for start in range(0, len(xp), args.batch_size):
                xb = xp[start : start + args.batch_size]
                for det in model.detectors_.values():
                    det._score_tensor(xb)

    out[f"networks{tag}_rows_per_s"] = best_rate(networks, len(rows), args.repeat, sync)
    out = {k: round(v) for k, v in out.items()}
    out[f"device_over_host_steps{tag}"] = round(
        out[f"score_device_steps{tag}_rows_per_s"] / out[f"score_host_steps{tag}_rows_per_s"], 2
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--fit-rows", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=262_144)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from anomaly import AnomalyModel
    from anomaly.estimator.detectors._base import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rng = np.random.default_rng(args.seed)
    both = make_rows(args.fit_rows + args.rows, args.features, rng)
    train, rows = both[: args.fit_rows], both[args.fit_rows :]

    t = time.perf_counter()
    # Fit on the CPU with up to 8 threads (what is timed is scoring; the scorers move the model
    # to the device), then score with --threads.
    fit_threads = min(8, os.cpu_count() or 1)
    model = AnomalyModel(target_fpr=0.001, seed=args.seed, device="cpu", threads=fit_threads)
    model.fit(train)
    torch.set_num_threads(args.threads)
    fit_s = time.perf_counter() - t

    result: dict = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "rows": args.rows,
        "features": args.features,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "fit_rows": args.fit_rows,
        "fit_s": round(fit_s, 1),
    }
    for bf16 in [False, True] if args.bf16 else [False]:
        result.update(measure(model, device, rows, args, bf16, sync))
    result["goal_rows_per_s"] = 20_000_000
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
