"""cProfile of the service's per-batch work (``ScoringService.process``) on a fresh SQLite store.

The service is built as ``bench/service_batch.py`` builds it (the fraud example, a small model
trained here, one torch thread, no broker); a fresh store means a fresh retraining reservoir, so
the run measures its fill phase, as a new service's first minutes do.

    python bench/service_profile.py                        # 40,000 records in batches of 500
    python bench/service_profile.py --batch 200 --records 20000 --top 60
    python bench/service_profile.py --batch 20 --records 10000 --db-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is first on sys.path and bench/storage.py would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--top", type=int, default=45, help="functions listed per ordering")
    parser.add_argument("--db-url", help="default: a fresh SQLite file")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch
    import yaml

    from anomaly.config import config_from_dict
    from anomaly.estimator.model import AnomalyModel
    from anomaly.synthetic.datasets import generate_fraud
    from streams.replay import encode_rows
    from streams.service import Message, ScoringService

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-profile-"))
    schema = yaml.safe_load((ROOT / "examples" / "fraud.yaml").read_text())["schema"]
    base = config_from_dict({"name": "bench", "schema": schema}, environ={})
    model = AnomalyModel.from_config(
        base, max_epochs=3, max_steps=300, progress=False, device="cpu", seed=0
    )
    normal = generate_fraud(5000, anomaly_fraction=0.0, seed=1)
    model.fit(normal.drop(columns=["is_anomaly", "anomaly_kind"]))
    model.save(tmp / "model")
    values = encode_rows(generate_fraud(args.records, anomaly_fraction=0.01, seed=2))
    cfg = config_from_dict(
        {
            # A PostgreSQL store keeps the rows of earlier runs: a new pipeline there.
            "name": "bench" if args.db_url is None else f"bench-{uuid.uuid4().hex[:6]}",
            "schema": schema,
            "database": {"url": args.db_url or f"sqlite:///{tmp / 'bench.db'}"},
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
    now = int(time.time() * 1000)
    messages = [Message("t", 0, i, value, now) for i, value in enumerate(values)]
    size = args.batch
    service.process(messages[:size])  # warm-up, outside the profile
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    for lo in range(size, len(messages), size):
        service.process(messages[lo : lo + size])
    profile.disable()
    elapsed = time.perf_counter() - start
    n = len(messages) - size
    print(f"{n / elapsed:,.0f} records/s under the profiler ({elapsed / n * 1e6:.1f} us/record)")
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
