"""``anomaly train``, ``anomaly score`` and ``anomaly inspect``.

Only argparse (and the already loaded pathlib and ``anomaly.errors``) is imported here; each
handler imports pandas/torch when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from anomaly.errors import DataError, UserFacingError

# Torch devices a command can score on; resolve_device says why one is unusable on this machine.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def register(subparsers: Any) -> None:
    train = subparsers.add_parser(
        "train",
        help="fit the detectors on normal records and write a model bundle",
        description="Fit the config's detectors (by default VAE, flow, GAN and two nearest-"
        "neighbour distances) on normal records (CSV or Parquet), calibrate them on a held-out "
        "part and write a model bundle directory.",
    )
    train.add_argument("--config", required=True, help="pipeline YAML file")
    train.add_argument("--data", required=True, help="normal records: .csv or .parquet")
    train.add_argument("--out", required=True, help="model bundle directory to create")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.set_defaults(handler=_train)

    score = subparsers.add_parser(
        "score",
        help="score records with a model bundle",
        description="Score records with a model bundle; writes the id column (if any), every "
        "detector's score and p-value, alert, severity and fired detectors.",
    )
    score.add_argument("--model", required=True, help="model bundle directory")
    score.add_argument("--data", required=True, help="records to score: .csv or .parquet")
    score.add_argument("--out", required=True, help="output file: .csv or .parquet")
    score.add_argument("--batch-size", type=int, default=8192)
    score.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="where torch scores (default auto: CUDA, then MPS, then CPU)",
    )
    score.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    score.set_defaults(handler=_score)

    inspect = subparsers.add_parser(
        "inspect",
        help="verify a model bundle and print its manifest summary",
        description="Verify every file's sha256 and the manifest's own content_sha256, and print "
        "version, identity (the manifest sha256 that `anomaly models register` records and "
        "`serve` compares), schema, thresholds, calibration quantiles and training summary "
        "as JSON.",
    )
    inspect.add_argument("--model", required=True, help="model bundle directory")
    inspect.add_argument("--full", action="store_true", help="print the whole manifest")
    inspect.set_defaults(handler=_inspect)


def read_table(path: str) -> Any:
    """A CSV or Parquet file as a DataFrame; unreadable or empty files raise DataError."""
    import pandas as pd

    p = Path(path)
    if p.is_dir():
        raise DataError(f"data file {p} is a directory: pass a .csv or .parquet file")
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix not in (".parquet", ".csv", ".txt") and not p.name.endswith(".csv.gz"):
        raise DataError(f"data file {p}: use .csv or .parquet")
    try:
        frame = pd.read_parquet(p) if suffix == ".parquet" else pd.read_csv(p)
    except pd.errors.EmptyDataError:
        raise DataError(f"data file {p} is empty") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read data file {p}: {exc}") from None
    if len(frame) == 0:
        raise DataError(f"data file {p} has no records")
    return frame


def check_output_file(path: str) -> None:
    """Raise DataError now if ``path`` cannot be written as a .csv or .parquet output file, so
    the command fails before the work rather than after it (scoring takes minutes)."""
    p = Path(path)
    if p.suffix.lower() not in (".csv", ".parquet"):
        raise DataError(f"output file {p}: use .csv or .parquet")
    if p.is_dir():
        raise DataError(f"output file {p} is a directory")
    parent = p.parent
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise DataError(f"output file {p}: directory {parent} {state}")


def problems_message(problems: list[tuple[int, str, str]], n_rows: int) -> str:
    """One line for ``Preprocessor.validate_frame``'s per-row problems.

    A missing column is reported once per row; saying "(and 2999 more)" after the field's name
    read as 2999 more missing fields, so it is said once with the number of rows. Otherwise the
    first problem row is shown with how many rows have one.
    """
    row, kind, message = problems[0]
    if kind == "missing_column":
        return f"{message} (in all {n_rows} rows)"
    rows = len({p[0] for p in problems})
    more = f" (first of {rows} rows with problems)" if rows > 1 else ""
    return f"row {row}: {kind}: {message}{more}"


def check_at_least_one(option: str, value: int | None) -> None:
    """Raise UserFacingError (one line, naming ``option``) for a count below 1; None is unset."""
    if value is not None and value < 1:
        raise UserFacingError(f"{option} must be >= 1, got {value}")


def _train(args: argparse.Namespace) -> int:
    import json

    from anomaly.config import load_config
    from anomaly.estimator.bundle import check_bundle_directory
    from anomaly.estimator.explain import json_safe
    from anomaly.estimator.model import AnomalyModel

    cfg = load_config(args.config)
    overrides = {"progress": False} if args.no_progress else {}
    # Before the data is read: a bad config or output is reported without waiting for a large
    # file, or for the training.
    model = AnomalyModel.from_config(cfg, **overrides)
    check_bundle_directory(args.out)
    frame = read_table(args.data)
    model.fit(frame)
    version = model.save(args.out)
    summary = json_safe({"version": version, "bundle": args.out, **model.metrics_})
    print(json.dumps(summary, indent=2, default=str, allow_nan=False))
    return 0


def _score(args: argparse.Namespace) -> int:
    import pandas as pd

    from anomaly.estimator.model import AnomalyModel
    from anomaly.scoring.scorer import BatchScorer

    check_at_least_one("--batch-size", args.batch_size)
    check_at_least_one("--threads", args.threads)
    check_output_file(args.out)
    model = AnomalyModel.load(args.model)
    frame = read_table(args.data)
    problems = model.preprocessor_.validate_frame(frame)
    if problems:
        raise DataError(f"data file {args.data}: {problems_message(problems, len(frame))}")
    scorer = BatchScorer(
        model, device=args.device, batch_size=args.batch_size, threads=args.threads
    )
    result = scorer.score(frame)
    out = result.scores.copy()
    schema = model.schema
    if schema is not None and schema.id_field and schema.id_field in frame.columns:
        out.insert(0, schema.id_field, frame[schema.id_field].to_numpy())
    out["alert"] = result.is_alert
    out["severity"] = pd.Series(result.severity, dtype=object)
    out["fired"] = [",".join(f) for f in result.fired]
    # A .parquet file, else a .csv one (check_output_file allows no other).
    if Path(args.out).suffix.lower() == ".parquet":
        out.to_parquet(args.out, index=False)
    else:
        out.to_csv(args.out, index=False)
    print(
        f"scored {len(out)} records with model {model.version}: "
        f"{int(result.is_alert.sum())} alert(s) at target_fpr={model.target_fpr} -> {args.out}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from anomaly.estimator.bundle import inspect_bundle

    info = inspect_bundle(args.model)
    if not args.full:
        keep = (
            "version",
            "manifest_sha256",
            "identity",
            "created_at",
            "libraries",
            "target_fpr",
            "detectors",
            "schema",
            "metrics",
            "training_data",
        )
        thresholds = {name: cal.get("threshold") for name, cal in info["calibration"].items()}
        info = {**{k: info.get(k) for k in keep}, "thresholds": thresholds}
    print(json.dumps(info, indent=2, sort_keys=False, default=str))
    return 0
