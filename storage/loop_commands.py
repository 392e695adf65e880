"""The operations loop's commands: ``anomaly drift`` (stored drift windows), ``anomaly retrain``
(a new version from the retraining reservoir) and ``anomaly evaluate --from-db`` (analyst
verdicts as labels). Only argparse is imported here; each handler imports what it needs when it
runs. The database arguments and helpers are those of ``storage.commands``.
"""

from __future__ import annotations

import argparse

from storage.commands import (
    cutoff_time,
    db_args,
    emit,
    emit_json,
    one_database,
    open_store,
    resolve_url,
)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _register_drift(subparsers)
    _register_retrain(subparsers)
    evaluate = subparsers.choices.get("evaluate")
    if evaluate is not None:  # registered by anomaly.cli.quality_commands, before this module
        _extend_evaluate(evaluate)


def _extend_evaluate(p: argparse.ArgumentParser) -> None:
    """``anomaly evaluate --from-db``: the core command cannot import storage, so storage adds
    the option to it and answers it; without --from-db the core's handler runs as before."""
    g = p.add_argument_group(
        "analyst verdicts as labels (--from-db)",
        "Labels from `anomaly alerts ack --verdict`: reviewed alerts only, so the report gives "
        "precision among reviewed alerts (per model version) and, with --model, which of them "
        "the model still flags; it cannot give recall or the false-positive rate on traffic.",
    )
    g.add_argument(
        "--from-db",
        nargs="?",
        const="",
        metavar="URL",
        help="read the verdicts from this database (no URL: ANOMALY_DATABASE_URL); --data and "
        "--label are then not used and --model is optional",
    )
    g.add_argument("--pipeline", help="whose alerts (default: the one pipeline with verdicts)")
    g.add_argument("--model-version", metavar="VERSION", help="only alerts this version raised")
    g.add_argument("--since", metavar="AGE|ISO", help="alerts ingested since, e.g. 30d")
    g.add_argument("--until", metavar="AGE|ISO", help="alerts ingested before")
    core = p.get_default("handler")

    def handler(args: argparse.Namespace) -> int:
        return core(args) if args.from_db is None else _evaluate_from_db(args)

    p.set_defaults(handler=handler)


def _register_drift(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "drift",
        help="stored drift windows: which windows drifted and which features moved",
        description="Print the drift windows the service stored (README, 'Drift'): per window "
        "the alert-rate and p-value uniformity tests and the features whose PSI passed the "
        "threshold, then the features that moved over the whole period.",
    )
    db_args(p)
    p.add_argument("--pipeline", help="default: the name in --config (else every pipeline)")
    p.add_argument(
        "--since", metavar="AGE|ISO", default="24h", help="e.g. 24h (default), 7d or an ISO time"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per window")
    p.set_defaults(handler=_drift)


def _register_retrain(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "retrain",
        help="train a new model version on the recent traffic the service sampled",
        description="Train a new model version on the pipeline's retraining reservoir (README, "
        "'Retraining'), less records confirmed as anomalies; shadow-score the most recent "
        "reservoir records (held out) with the active and the new version and print both alert "
        "rates beside target_fpr; register the new version (inactive unless --activate).",
    )
    p.add_argument("--config", required=True, metavar="PIPELINE.yaml", help="pipeline config")
    p.add_argument(
        "--since", metavar="AGE|ISO", help="only records sampled since, e.g. 7d (default: all)"
    )
    p.add_argument("--out", metavar="DIR", help="bundle directory (default: beside the active)")
    p.add_argument("--activate", action="store_true", help="make the new version active")
    p.add_argument(
        "--exclude-alerts",
        action="store_true",
        help="leave out every record that alerted (default: only confirmed anomalies)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="share of the most recent records held out for shadow scoring (default 0.2)",
    )
    p.set_defaults(handler=_retrain)


def _evaluate_from_db(args: argparse.Namespace) -> int:
    from anomaly.evaluation.verdicts import run_verdict_evaluation
    from storage.errors import InvalidArgumentError
    from storage.verdicts import verdict_data

    for flag, value in (("--data", args.data), ("--label", args.label)):
        if value is not None:
            raise InvalidArgumentError(f"{flag}: not with --from-db (the verdicts are the labels)")
    if args.pipeline is not None:
        from anomaly.config import check_pipeline_name

        check_pipeline_name(args.pipeline, "--pipeline")
    since = cutoff_time(args.since, "--since") if args.since else None
    until = cutoff_time(args.until, "--until") if args.until else None
    url = resolve_url(argparse.Namespace(db=args.from_db or None, config=None))
    from storage.store import AlertStore

    # Reading only: a mistyped SQLite path must not leave an empty database file behind.
    with AlertStore(url, create=False) as store:
        data = verdict_data(store, args.pipeline, args.model_version, since, until)
    report, html_path, json_path = run_verdict_evaluation(
        data, args.report, model_dir=args.model, target_fpr=args.target_fpr, device=args.device
    )
    emit(
        f"pipeline {data.scope['pipeline']}: {len(data.labels)} reviewed alerts "
        "(labels: analyst verdicts; precision among reviewed alerts only, no recall)"
    )
    emit(
        f"{'model_version':<16} {'alerts':>7} {'reviewed':>8} {'TP':>5} {'FP':>5} {'precision':>9}"
    )
    for r in report["as_alerted"]:
        precision = "-" if r["precision"] is None else f"{r['precision']:.3f}"
        emit(
            f"{r['model_version']:<16} {r['alerts']:>7} {r['reviewed']:>8} "
            f"{r['true_positives']:>5} {r['false_positives']:>5} {precision:>9}"
        )
    if report["rescored"]:
        r = report["rescored"]
        emit(
            f"re-scored by {r['model_version']}: flags {r['flagged']} of {len(data.labels)} "
            f"({r['flagged_true_positives']} confirmed, {r['flagged_false_positives']} rejected)"
        )
    emit(f"report: {html_path}")
    emit(f"json:   {json_path}")
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from anomaly.config import load_config
    from storage.engine import config_database_url
    from storage.retrain import format_report, retrain
    from storage.store import AlertStore

    since = cutoff_time(args.since, "--since") if args.since else None
    cfg = load_config(args.config)
    with AlertStore(config_database_url(cfg), create=False) as store:
        report = retrain(
            cfg,
            store,
            since=since,
            out=args.out,
            activate=args.activate,
            exclude_alerts=args.exclude_alerts,
            holdout=args.holdout,
        )
    for line in format_report(report):
        emit(line)
    return 0


def _drift(args: argparse.Namespace) -> int:
    from anomaly.config import DriftConfig, check_pipeline_name, load_config

    since = cutoff_time(args.since, "--since")
    one_database(args)
    drift_cfg, pipeline = DriftConfig(), None
    if args.config:
        cfg = load_config(args.config)
        drift_cfg, pipeline = cfg.drift, cfg.name
    if args.pipeline:
        pipeline = check_pipeline_name(args.pipeline, "--pipeline")
    with open_store(args) as store:
        rows = store.list_drift_windows(pipeline, since)
    if args.json:
        for row in rows:
            emit_json(row)
        return 0
    where = f"pipeline {pipeline}" if pipeline else "all pipelines"
    if not rows:
        emit(f"no drift windows for {where} since {since.isoformat(timespec='seconds')}")
        return 0
    threshold = drift_cfg.psi_threshold
    drifted = [r for r in rows if r["drifted"]]
    tested = sum(r["ks_p"] is not None for r in rows)
    emit(
        f"{where}: {len(rows)} windows since {since.isoformat(timespec='seconds')} "
        f"({tested} with enough records to test), {len(drifted)} drifted"
    )
    moved: dict[str, list[float]] = {}
    for r in rows:
        for item in r["top_features"]:
            if item["psi"] > threshold:
                moved.setdefault(item["feature"], []).append(item["psi"])
    for r in drifted:
        start = r["window_start"].isoformat(timespec="seconds")
        emit(
            f"  DRIFT {r['pipeline']} {start} ({r['records']} records, {r['alerts']} alerts, "
            f"model {r['model_version'] or '-'}): {'; '.join(r['reasons'])}"
        )
    if moved:
        ranked = sorted(moved.items(), key=lambda kv: -max(kv[1]))
        emit(f"features that moved (PSI > {threshold:g}):")
        for name, values in ranked:
            emit(f"  {name}: {len(values)} window(s), max PSI {max(values):.3f}")
    else:
        emit(f"no feature moved (PSI > {threshold:g} in no window)")
    return 0
