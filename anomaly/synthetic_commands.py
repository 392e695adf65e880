"""``anomaly generate``: write an example dataset (fraud or manufacturing) with labeled anomalies.

Only ``argparse`` is imported here; numpy and pandas are imported when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="write an example dataset with labeled anomalies (CSV or Parquet)",
        description="Generate realistic normal records with labeled anomalies for an example "
        "pipeline (examples/fraud.yaml, examples/manufacturing.yaml). The columns are the "
        "pipeline's id, time, entity and features plus is_anomaly and anomaly_kind.",
    )
    p.add_argument("--example", required=True, choices=["fraud", "manufacturing"])
    p.add_argument("--rows", type=int, default=10_000, help="number of records (default 10000)")
    p.add_argument(
        "--anomaly-fraction",
        type=float,
        default=0.01,
        help="share of records that are injected anomalies (default 0.01)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-labels",
        action="store_true",
        help="leave out is_anomaly and anomaly_kind (training data, replayed traffic)",
    )
    p.add_argument("--out", required=True, help="output file, .csv or .parquet")
    p.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from anomaly.errors import UserFacingError
    from anomaly.synthetic import generate, write_frame

    if not args.out.lower().endswith((".csv", ".parquet")):
        raise UserFacingError(f"--out must end in .csv or .parquet: {args.out}")
    try:
        frame = generate(args.example, args.rows, args.anomaly_fraction, args.seed)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    kinds = frame.loc[frame["is_anomaly"] == 1, "anomaly_kind"].value_counts().sort_index()
    detail = ", ".join(f"{k} {v}" for k, v in kinds.items()) or "none"
    if args.no_labels:
        frame = frame.drop(columns=["is_anomaly", "anomaly_kind"])
    write_frame(frame, args.out)
    print(f"wrote {len(frame)} {args.example} records to {args.out} (anomalies: {detail})")
    return 0
