"""``anomaly retrain``: train a new model version on the retraining reservoir (README,
"Retraining").

1. Read the pipeline's reservoir rows (storage.reservoir) sampled since ``--since``, less the
   records an analyst confirmed as anomalies (and with ``exclude_alerts`` every record that
   alerted when it was scored).
2. Hold out the most recent ``holdout`` share (by sampling time, then Kafka position): the
   shadow set, never trained on.
3. Fit a model with the pipeline's ``model`` settings on the rest and save its bundle.
4. Shadow-score the held-out records with the active version and the new one, and report both
   alert rates beside ``target_fpr`` (the held-out records are recent traffic, mostly normal:
   an alert rate far above the target says the model no longer fits it).
5. Register the new version, inactive unless ``activate`` (``anomaly models activate`` later).

Here because it needs both the core (training, scoring) and the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from storage.errors import InvalidArgumentError
from storage.records import ModelVersionRecord

# Fewer training records than this is refused: calibration needs a tail to measure.
MIN_TRAIN_ROWS = 100


@dataclass
class ShadowRate:
    version: str
    alerts: int
    records: int

    @property
    def rate(self) -> float:
        return self.alerts / self.records if self.records else float("nan")


@dataclass
class RetrainReport:
    pipeline: str
    version: str
    bundle: str
    active: bool
    target_fpr: float
    trained_on: int
    held_out: int
    excluded_alerts: int
    shadow: list[ShadowRate] = field(default_factory=list)


def reservoir_frame(
    store: Any, cfg: Any, since: datetime | None, exclude_alerts: bool
) -> tuple[Any, int]:
    """The reservoir's records as a DataFrame of the schema's fields (oldest sample first; the
    records hold every field their producer wrote) and how many alerting records
    ``exclude_alerts`` left out."""
    import pandas as pd

    pipeline = cfg.name
    rows = store.reservoir_rows(pipeline, since)
    if not rows and not store.list_model_versions(pipeline) and not store.reservoir_count(pipeline):
        raise InvalidArgumentError(
            f"unknown pipeline {pipeline!r}: no model versions and no reservoir rows in this "
            "database"
        )
    excluded = 0
    if exclude_alerts:
        kept = [r for r in rows if not r["alerted"]]
        excluded, rows = len(rows) - len(kept), kept
    if not rows:
        when = f" since {since.isoformat(timespec='seconds')}" if since else ""
        raise InvalidArgumentError(
            f"pipeline {pipeline!r}: the retraining reservoir is empty{when} (is the service "
            "running with retraining.enabled?)"
        )
    rows.sort(key=lambda r: (r["sampled_at"], r["kafka_partition"], r["kafka_offset"]))
    frame = pd.DataFrame([r["record"] for r in rows])
    s = cfg.schema
    wanted = dict.fromkeys(c for c in (s.id_field, s.time_field, s.entity_field, *s.features) if c)
    return frame[[c for c in wanted if c in frame.columns]], excluded


def _load_active(store: Any, cfg: Any) -> tuple[Any, str, Path] | None:
    """The model the service scores with now: the active version, else ``serve.model_dir``."""
    from anomaly.estimator.model import AnomalyModel

    rec = store.active_model_version(cfg.name)
    if rec is not None:
        return AnomalyModel.load(rec.bundle_path), rec.version, Path(rec.bundle_path)
    if cfg.serve.model_dir:
        model = AnomalyModel.load(cfg.serve.model_dir)
        return model, str(model.version), Path(cfg.serve.model_dir)
    return None


def _alerts(model: Any, frame: Any) -> int:
    from anomaly.scoring.scorer import BatchScorer

    result = BatchScorer(model, device="cpu", threads=1).score(frame)
    return int(result.is_alert.sum())


def retrain(
    cfg: Any,
    store: Any,
    *,
    since: datetime | None = None,
    out: str | Path | None = None,
    activate: bool = False,
    exclude_alerts: bool = False,
    holdout: float = 0.2,
    **model_overrides: Any,
) -> RetrainReport:
    """Train, shadow-score and register a new version of ``cfg``'s pipeline (module docstring).

    ``model_overrides`` go to ``AnomalyModel.from_config`` (tests pass small budgets)."""
    from anomaly.estimator.bundle import check_bundle_directory
    from anomaly.estimator.model import AnomalyModel

    if not 0.0 <= holdout < 1.0:
        raise InvalidArgumentError(f"--holdout must be in [0, 1), got {holdout}")
    frame, excluded = reservoir_frame(store, cfg, since, exclude_alerts)
    n_hold = int(len(frame) * holdout)
    train, shadow = frame.iloc[: len(frame) - n_hold], frame.iloc[len(frame) - n_hold :]
    if len(train) < MIN_TRAIN_ROWS:
        raise InvalidArgumentError(
            f"pipeline {cfg.name!r}: {len(train)} reservoir records to train on, fewer than "
            f"{MIN_TRAIN_ROWS} (widen --since or wait for traffic)"
        )
    active = _load_active(store, cfg)
    if out is not None:
        check_bundle_directory(out)  # before the training, not after it

    model = AnomalyModel.from_config(cfg, **{"progress": False, **model_overrides})
    model.fit(train.reset_index(drop=True))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    if out is None:
        parent = active[2].resolve().parent if active is not None else Path.cwd()
        out = parent / f"{cfg.name}-retrain-{stamp}"
    root = Path(out).resolve()
    version = model.save(root)
    loaded = AnomalyModel.load(root)  # what is registered is what was verified on disk

    rates: list[ShadowRate] = []
    if len(shadow):
        shadow = shadow.reset_index(drop=True)
        if active is not None:
            rates.append(ShadowRate(active[1], _alerts(active[0], shadow), len(shadow)))
        rates.append(ShadowRate(str(version), _alerts(loaded, shadow), len(shadow)))

    summary = {
        "trained_on": len(train),
        "held_out": len(shadow),
        "since": since.isoformat() if since else None,
        "shadow_alert_rates": {r.version: r.rate for r in rates},
    }
    rec = ModelVersionRecord.of_bundle(cfg.name, loaded, root, retrain=summary)
    rec = store.register_model_version(rec, activate=activate)
    return RetrainReport(
        pipeline=cfg.name,
        version=rec.version,
        bundle=str(root),
        active=rec.active,
        target_fpr=float(loaded.target_fpr),
        trained_on=len(train),
        held_out=len(shadow),
        excluded_alerts=excluded,
        shadow=rates,
    )


def format_report(r: RetrainReport) -> list[str]:
    lines = [
        f"pipeline {r.pipeline}: trained version {r.version} on {r.trained_on} reservoir "
        f"records ({r.excluded_alerts} alerting records left out) -> {r.bundle}",
    ]
    if r.shadow:
        lines.append(
            f"shadow scoring on the {r.held_out} most recent reservoir records (not trained on), "
            f"target_fpr {r.target_fpr:g}:"
        )
        lines.append(f"  {'version':<24} {'alerts':>7} {'rate':>8} {'x target':>9}")
        for s in r.shadow:
            lines.append(
                f"  {s.version:<24} {s.alerts:>7} {s.rate:>8.4f} {s.rate / r.target_fpr:>9.2f}"
            )
    else:
        lines.append("no records held out (--holdout 0): no shadow scoring")
    state = "active" if r.active else "registered (not active; `anomaly models activate`)"
    lines.append(f"model version {r.version} {state}")
    return lines
