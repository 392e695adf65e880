"""Microseconds per record that drift monitoring adds to a scored batch, beside the scoring itself.

A small fraud model (examples/fraud.yaml schema, ``--detectors``, a few hundred training steps,
target_fpr 0.01) scores batches of ``--batch`` normal records; ``DriftMonitor.observe`` is timed
on the same batches (the numeric block extracted from the frame, the p-value histogram, the
per-feature decile counts), and ``observe_values`` on the numeric block the scorer already read,
which is what ``serve`` runs. The
window's report (the tests) runs once per closed window (hourly by default) and is timed apart.
Each figure is the best of ``--rounds`` rounds.

    python bench/drift.py                       # batches of 1000, kNN only
    python bench/drift.py --batch 100 --detectors vae flow gan knn
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml

from anomaly.config import DriftConfig, config_from_dict
from anomaly.estimator.model import AnomalyModel
from anomaly.monitoring.drift import DriftMonitor
from anomaly.scoring.scorer import BatchScorer
from anomaly.synthetic.datasets import generate_fraud


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--detectors", nargs="+", default=["knn"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    schema = yaml.safe_load((Path(__file__).parents[1] / "examples" / "fraud.yaml").read_text())
    cfg = config_from_dict({"name": "bench", "schema": schema["schema"]}, environ={})
    rows = generate_fraud(3000 + args.batch * args.batches, anomaly_fraction=0.0, seed=11)
    rows = rows.drop(columns=["is_anomaly", "anomaly_kind"]).sample(frac=1.0, random_state=0)
    model = AnomalyModel.from_config(
        cfg,
        target_fpr=0.01,
        detectors=args.detectors,
        max_epochs=3,
        max_steps=300,
        progress=False,
        threads=1,
    )
    model.fit(rows.iloc[:3000])
    scorer = BatchScorer(model)
    stream = rows.iloc[3000:].reset_index(drop=True)
    frames = [stream.iloc[i * args.batch : (i + 1) * args.batch] for i in range(args.batches)]
    now = datetime.now(UTC)
    n = args.batch * args.batches
    best_score = best_observe = best_values = best_report = float("inf")
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        scored = [scorer.score(f) for f in frames]
        t1 = time.perf_counter()
        monitor = DriftMonitor(model, DriftConfig(), "bench")
        for f, s in zip(frames, scored, strict=True):
            monitor.observe(f, s.columns["ensemble_p"], now)
        t2 = time.perf_counter()
        monitor.report()
        t3 = time.perf_counter()
        # What serve runs: the scorer's numeric block, not extracted from the frame again.
        monitor = DriftMonitor(model, DriftConfig(), "bench")
        for s in scored:
            monitor.observe_values(s.numeric, s.columns["ensemble_p"], now)
        best_values = min(best_values, (time.perf_counter() - t3) / n * 1e6)
        best_score = min(best_score, (t1 - t0) / n * 1e6)
        best_observe = min(best_observe, (t2 - t1) / n * 1e6)
        best_report = min(best_report, (t3 - t2) * 1e3)
    print(f"batch {args.batch}, detectors {' '.join(args.detectors)}")
    print(f"  score:   {best_score:7.2f} us/record")
    print(f"  observe: {best_observe:7.2f} us/record ({best_observe / best_score:.1%} of scoring)")
    print(f"  observe with the scorer's numeric block (serve): {best_values:7.2f} us/record")
    print(f"  report:  {best_report:7.2f} ms per closed window")


if __name__ == "__main__":
    main()
