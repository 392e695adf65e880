"""``anomaly generate``: write an example dataset (fraud or manufacturing) with labeled anomalies.

Only ``argparse`` and ``anomaly.errors`` are imported here; numpy and pandas are imported when
the command runs.
"""

from __future__ import annotations

import argparse

from anomaly.errors import UserFacingError


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
    p.add_argument(
        "--train-rows",
        type=int,
        default=None,
        metavar="N",
        help="split: the first N records in time, anomalies and labels removed, go to "
        "--train-out (to fit a model on); the rest, from the same cards or machines, to --out",
    )
    p.add_argument("--train-out", metavar="FILE", help="where the training part goes")
    p.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from anomaly.synthetic.datasets import generate, split_train_stream, write_frame

    for path in (args.out, args.train_out):
        if path is not None and not path.lower().endswith((".csv", ".parquet")):
            raise UserFacingError(f"output files must end in .csv or .parquet: {path}")
    if (args.train_rows is None) != (args.train_out is None):
        raise UserFacingError("--train-rows and --train-out go together")
    try:
        frame = generate(args.example, args.rows, args.anomaly_fraction, args.seed)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    if args.train_rows is not None:
        try:
            train, frame = split_train_stream(frame, args.train_rows)
        except ValueError as exc:
            raise UserFacingError(f"--train-rows: {exc}") from exc
        write_frame(train, args.train_out)
        print(f"wrote {len(train)} normal {args.example} records to {args.train_out} (training)")
    kinds = frame.loc[frame["is_anomaly"] == 1, "anomaly_kind"].value_counts().sort_index()
    detail = ", ".join(f"{k} {v}" for k, v in kinds.items()) or "none"
    if args.no_labels:
        frame = frame.drop(columns=["is_anomaly", "anomaly_kind"])
    write_frame(frame, args.out)
    print(f"wrote {len(frame)} {args.example} records to {args.out} (anomalies: {detail})")
    return 0
