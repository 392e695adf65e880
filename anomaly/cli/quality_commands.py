"""``anomaly evaluate``: how good is a trained model on labeled data?

Only ``argparse`` and ``anomaly.errors`` are imported here; numpy, pandas, torch and matplotlib
are imported when the command runs, so ``anomaly --help`` stays fast.
"""

from __future__ import annotations

import argparse

from anomaly.cli.model_commands import DEVICE_CHOICES
from anomaly.errors import DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="measure a trained model on labeled data; write an HTML and JSON report",
        description="Score labeled records with a trained model and report, for each detector "
        "and the ensemble, AUROC, AUPRC, and precision, recall, F1 and the observed "
        "false-positive rate at the calibrated threshold. Writes DIR/report.html (self-contained, "
        "with plots) and DIR/report.json (the same numbers).",
    )
    # --model, --data and --label are checked by the handler, not argparse: storage's
    # `--from-db` (added to this command when storage is installed) uses none of the last two.
    p.add_argument("--model", metavar="MODEL_DIR", help="a saved model bundle (required)")
    p.add_argument("--data", metavar="LABELED", help="labeled records, .csv or .parquet (required)")
    p.add_argument(
        "--label",
        metavar="COLUMN",
        help="the label column: 1 = anomaly, 0 = normal (required)",
    )
    p.add_argument("--report", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--target-fpr",
        type=float,
        default=None,
        help="alert threshold as a false-positive rate (default: the model's target)",
    )
    p.add_argument(
        "--top-rows",
        type=int,
        default=10,
        help="explain this many highest-scoring rows (default 10; 0 to skip)",
    )
    p.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="where torch scores (default auto)"
    )
    p.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from anomaly.evaluation.run import run_evaluation

    missing = [f"--{k}" for k in ("model", "data", "label") if getattr(args, k) is None]
    if missing:
        raise DataError(f"evaluate: {', '.join(missing)} required")

    result, html_path, json_path = run_evaluation(
        model_dir=args.model,
        data_path=args.data,
        label=args.label,
        report_dir=args.report,
        target_fpr=args.target_fpr,
        top_rows=args.top_rows,
        device=args.device,
    )
    print(
        f"{result.n_rows} rows ({result.n_anomalies} anomalous), target FPR {result.target_fpr:g}"
    )
    print(
        f"{'detector':<10} {'AUROC':>7} {'AUPRC':>7} {'prec':>6} {'recall':>6} {'F1':>6} {'FPR':>8}"
    )
    for name, m in result.detectors.items():
        print(
            f"{name:<10} {m.auroc:7.4f} {m.auprc:7.4f} {m.precision:6.3f} {m.recall:6.3f} "
            f"{m.f1:6.3f} {m.observed_fpr:8.5f}"
        )
    print(f"report: {html_path}")
    print(f"json:   {json_path}")
    return 0
