"""``anomaly serve`` and ``anomaly replay`` (and room for ``anomaly demo``).

Only ``argparse`` is imported here; each handler imports Kafka, torch and SQLAlchemy itself so
that ``anomaly --help`` stays fast.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="consume the pipeline's topic, score micro-batches, store alerts",
        description=(
            "Run the scoring service: consume the pipeline's Kafka topic in micro-batches, "
            "score them, write alerts, dead letters, statistics and offsets to the database in "
            "one transaction, then commit to Kafka. SIGTERM/SIGINT drain the batch in flight."
        ),
    )
    serve.add_argument("--config", required=True, metavar="PIPELINE.yaml")
    serve.add_argument(
        "--stop-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit cleanly once no record has arrived for this long (tests, backfills)",
    )
    serve.set_defaults(handler=_serve)

    replay = subparsers.add_parser(
        "replay",
        help="produce a CSV or Parquet file into the pipeline's topic",
        description="Produce each row as a JSON record keyed by the schema's entity field.",
    )
    replay.add_argument("--config", required=True, metavar="PIPELINE.yaml")
    replay.add_argument("--data", required=True, metavar="FILE", help=".csv or .parquet")
    replay.add_argument("--rate", type=float, default=None, help="records per second at most")
    replay.add_argument("--limit", type=int, default=None, help="produce the first N rows only")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.set_defaults(handler=_replay)

    demo = subparsers.add_parser(
        "demo",
        help="the whole service on embedded defaults: train, replay, serve, summarize",
        description=(
            "Start the embedded broker, generate the fraud and manufacturing example data, "
            "train both models, replay the streams with injected anomalies into a SQLite-backed "
            "service, print precision and recall against the injected labels, and write the "
            "evaluation reports and the dashboards. Ctrl-C stops it cleanly."
        ),
    )
    demo.add_argument("--out", default="demo-output", metavar="DIR", help="output directory")
    demo.add_argument("--short", action="store_true", help="tiny data and training (tests)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--db",
        metavar="URL",
        help="use this database instead of a new SQLite file in --out (PostgreSQL: the Grafana "
        "dashboards can show the run)",
    )
    demo.set_defaults(handler=_demo)


def _serve(args: argparse.Namespace) -> int:
    from anomaly.config import load_config
    from streams.metrics import use_json_logs
    from streams.service import run_service

    use_json_logs()
    cfg = load_config(args.config)
    return run_service(cfg, stop_when_idle_s=args.stop_when_idle)


def _replay(args: argparse.Namespace) -> int:
    import sys

    from anomaly.config import load_config
    from anomaly.errors import DataError
    from streams.replay import replay

    if args.rate is not None and not args.rate > 0:
        raise DataError(
            f"--rate must be > 0 records/s (or left out: as fast as possible), got {args.rate}"
        )
    cfg = load_config(args.config)
    result = replay(
        cfg,
        args.data,
        rate=args.rate,
        limit=args.limit,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(
        f"produced {result.produced} records to {cfg.kafka.topic} in {result.seconds:.1f} s "
        f"({result.rate:,.0f}/s)" + (f", {result.failed} failed" if result.failed else "")
    )
    return 1 if result.failed else 0


def _demo(args: argparse.Namespace) -> int:
    import logging

    from streams.demo import run_demo

    if not args.verbose:  # the summary says what matters; per-batch logs would drown it
        logging.getLogger().setLevel(logging.WARNING)
    run_demo(args.out, short=args.short, seed=args.seed, db_url=args.db)
    return 0
