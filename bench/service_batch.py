"""Records/s of the service's per-batch work, this tree against a baseline revision, paired.

One ``ScoringService.process`` call per micro-batch (decode and validate, the model's checks,
scoring, the sink batch, the SQLite transaction; no broker: the Kafka commit has no assigned
partition to commit), over 20,000 generated fraud records per round, for each ``--batch``
size. This tree and ``--baseline`` (checked out into a temporary git worktree) each run in a
worker process of their own, set up once (same model seed, same records); rounds alternate
between them (ABBA...), so a machine whose speed drifts slows both alike, and each round of one
is compared with the neighbouring round of the other: the figure is the median of those paired
ratios, with their range.

    python bench/service_batch.py                          # against the session's start
    python bench/service_batch.py --baseline HEAD~1 --batch 1000 --rounds 12
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is first on sys.path and bench/storage.py would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
BASELINE = "4c0b216"  # main at the start of the 2026-12-01 service-overhead work
RECORDS = 20_000


def worker(sizes: list[int]) -> None:
    """Set up, say "ready", then run one round per line read and print records/s per size."""
    warnings.simplefilter("ignore")
    import torch
    import yaml

    from anomaly.config import config_from_dict
    from anomaly.estimator.model import AnomalyModel
    from anomaly.synthetic.datasets import generate_fraud
    from streams import service as svc  # older revisions name the message class _Message
    from streams.replay import encode_rows

    ScoringService, Message = svc.ScoringService, getattr(svc, "Message", None) or svc._Message

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-batch-"))
    schema = yaml.safe_load((ROOT / "examples" / "fraud.yaml").read_text())["schema"]
    labels = ["is_anomaly", "anomaly_kind"]
    base = config_from_dict({"name": "bench", "schema": schema}, environ={})
    model = AnomalyModel.from_config(
        base, max_epochs=3, max_steps=300, progress=False, device="cpu", seed=0
    )
    model.fit(generate_fraud(5000, anomaly_fraction=0.0, seed=1).drop(columns=labels))
    model.save(tmp / "model")
    values = encode_rows(generate_fraud(RECORDS, anomaly_fraction=0.01, seed=2))
    services = {}
    for size in sizes:
        cfg = config_from_dict(
            {
                "name": f"bench-{size}",
                "schema": schema,
                "database": {"url": f"sqlite:///{tmp / f'{size}.db'}"},
                "kafka": {"topic": "t"},
                "serve": {
                    "metrics_port": None,
                    "model_dir": str(tmp / "model"),
                    "threads": 1,
                    "device": "cpu",
                },
            },
            environ={},
        )
        service = ScoringService(cfg)
        service.store.upgrade()
        service._load_model(initial=True)
        services[size] = service
    next_offset = 0

    def one_round(size: int) -> float:
        nonlocal next_offset
        now = int(time.time() * 1000)
        messages = [Message("t", 0, next_offset + i, value, now) for i, value in enumerate(values)]
        next_offset += len(values)  # new offsets: nothing is fenced as already written
        start = time.perf_counter()
        for lo in range(0, len(messages), size):
            services[size].process(messages[lo : lo + size])
        return len(messages) / (time.perf_counter() - start)

    for size in sizes:
        one_round(size)  # warm-up
    print("ready", flush=True)
    for _line in sys.stdin:
        print(" ".join(f"{one_round(size):.1f}" for size in sizes), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline")
    parser.add_argument("--batch", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.batch)
        return 0

    import numpy as np

    tree = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-q", str(tree), args.baseline],
        cwd=ROOT,
        check=True,
    )
    try:
        sides = {"baseline": tree, "current": ROOT}
        procs = {}
        for name, path in sides.items():
            env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch"]
            procs[name] = subprocess.Popen(
                [*cmd, *map(str, args.batch)],
                cwd=tempfile.gettempdir(),  # so that PYTHONPATH, not this folder, is imported
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        for proc in procs.values():
            while (line := proc.stdout.readline()) and line.strip() != "ready":
                pass
        rates: dict[str, list[list[float]]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in ("baseline", "current") if r % 2 == 0 else ("current", "baseline"):
                proc = procs[name]
                proc.stdin.write("go\n")
                proc.stdin.flush()
                rates[name].append([float(x) for x in proc.stdout.readline().split()])
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    base, cur = np.array(rates["baseline"]), np.array(rates["current"])
    print(f"baseline {args.baseline}, {args.rounds} rounds each of {RECORDS:,} records, SQLite")
    for j, size in enumerate(args.batch):
        ratio = cur[:, j] / base[:, j]
        print(
            f"batch {size:>5}: baseline median {np.median(base[:, j]):>9,.0f} rec/s, "
            f"current median {np.median(cur[:, j]):>9,.0f} rec/s, paired ratio median "
            f"{np.median(ratio):.2f}x (range {ratio.min():.2f}-{ratio.max():.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
