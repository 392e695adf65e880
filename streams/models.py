"""The scoring service's model: load the active version, check its identity, warm it up, and
switch to another version at a batch boundary.

``ModelsMixin`` is one part of ``streams.service.ScoringService``. The active version comes from
the database (``AlertStore.active_model_version``), or ``serve.model_dir`` when none is
registered; a bundle that is not the one registered is refused (``anomaly_model_identity_ok``,
``/readyz`` detail) and the service keeps scoring with the model it has.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from anomaly.errors import BundleError, ConfigError, IdentityError
from storage.errors import RetryableStorageError
from streams.batch import Message
from streams.decode import DecodedBatch
from streams.rejects import INVALID_VALUE

log = logging.getLogger("streams.service")

# Records in the scorer's warm-up batch (a few alert, so the explanation path warms up too).
WARM_UP_ROWS = 64


@dataclass
class LoadedModel:
    model: Any  # anomaly.estimator.model.AnomalyModel
    scorer: Any  # anomaly.scoring.scorer.BatchScorer
    version: str


class ModelsMixin:
    """Model versions of ``ScoringService`` (its attributes: ``cfg``, ``pipeline``, ``topic``,
    ``metrics``, ``health``, ``store``, ``loaded``, ``_last_model_poll``, ``decoder``; and its
    ``_sink_batch`` and ``_with_db_retry`` for the warm-up and the load)."""

    cfg: Any
    pipeline: str
    topic: str
    metrics: Any
    health: Any
    store: Any
    loaded: LoadedModel | None
    _last_model_poll: float
    decoder: Any
    _sink_batch: Any
    _with_db_retry: Any

    def _model_checks(
        self, decoded: DecodedBatch, messages: list[Message], loaded: LoadedModel
    ) -> DecodedBatch:
        """The model's own per-row checks (e.g. values its preprocessor cannot use)."""
        if not decoded.n_valid:
            return decoded
        problems = loaded.model.preprocessor_.validate_frame(decoded.frame)
        if not problems:
            return decoded
        return decoded.without(
            [(row, kind or INVALID_VALUE, message) for row, kind, message in problems],
            [m.partition for m in messages],
            [m.offset for m in messages],
        )

    def _load_model(self, initial: bool = False) -> None:
        from anomaly.estimator.bundle import CONTENT_KEY
        from anomaly.estimator.model import AnomalyModel
        from anomaly.scoring.scorer import BatchScorer

        serve = self.cfg.serve
        record = self._with_db_retry(
            lambda: self.store.active_model_version(self.pipeline), "reading the model version"
        )
        expected: str | None = None
        if record is not None:
            path, version, expected = record.bundle_path, record.version, record.bundle_sha256
        elif serve.model_dir:
            path, version = serve.model_dir, None
        else:
            raise ConfigError(
                f"pipeline {self.pipeline!r} has no active model version in the database and "
                "serve.model_dir is not set: train a model and register it, or set serve.model_dir"
            )
        try:
            # The registered sha256 is compared before anything else is read: a directory
            # swapped for another (self-consistent) bundle must not score under this version.
            model = AnomalyModel.load(
                path,
                expected_sha256=expected,
                registered_as=f"model version {version!r} of pipeline {self.pipeline!r}",
            )
        except BundleError as exc:
            self._model_refused(version, exc)
            raise
        if expected is None and model.manifest_.get(CONTENT_KEY) is None:
            log.warning(
                "bundle has neither a registered identity nor a content_sha256 (saved before "
                "it existed): an edited manifest.json cannot be detected; register the bundle",
                extra={"fields": {"bundle": str(path)}},
            )
        version = version or model.version or "unversioned"
        model.version = version
        scorer = BatchScorer(
            model,
            device=serve.device,
            batch_size=serve.scoring_batch_size,
            bf16=serve.bf16,
            threads=serve.threads,
        )
        loaded = LoadedModel(model=model, scorer=scorer, version=version)
        self._warm_up(loaded)
        self.loaded = loaded
        self._last_model_poll = time.monotonic()
        self.metrics.set_device(scorer.device)
        self.metrics.set_model_version(version)
        self.metrics.set_target_fpr(model.target_fpr)
        self.metrics.set_model_identity_ok(True)
        self.health.set("model_loaded", True)
        self.health.set_detail("model", None)
        log.info(
            "model loaded" if initial else "model switched",
            extra={"fields": {"version": version, "bundle": str(path), "device": scorer.device}},
        )

    def _model_refused(self, version: str | None, exc: BundleError) -> None:
        """Tell the operator (/readyz detail, metric) why the active version is not scoring."""
        if isinstance(exc, IdentityError):
            self.metrics.set_model_identity_ok(False)
        current = f"scoring with {self.loaded.version!r}" if self.loaded else "nothing loaded"
        self.health.set_detail("model", f"model version {version!r} refused ({current}): {exc}")

    def _warm_up(self, loaded: LoadedModel) -> None:
        """Decode, check, score and build the sink batch of made-up records once, before the
        first real batch: the first calls into torch, pandas and the decoder cost ~200 ms
        (bench/stream.py --rate 1000: the first batch took 214 ms against ~20 ms later), which
        every record of the first seconds would otherwise wait for. Nothing is written, and
        nothing is asked of a schema registry (the values are read with the file's schema)."""
        from streams.replay import encode_values

        started = time.perf_counter()
        try:
            frame = typical_records(loaded.model, self.cfg.schema, WARM_UP_ROWS)
            values = encode_values(frame, self.cfg, warm_up=True)
            messages = [Message(self.topic, 0, i, v, None) for i, v in enumerate(values)]
            decoder = self.decoder.for_warm_up()
            decoded = decoder.decode(
                values, partitions=[0] * len(values), offsets=list(range(len(values)))
            )
            decoded = self._model_checks(decoded, messages, loaded)
            result = loaded.scorer.score(decoded.frame) if decoded.n_valid else None
            self._sink_batch(
                messages, decoded, result, loaded, datetime.now(UTC), decoder.stored_record
            )
        except Exception as exc:  # a warm-up must never keep the service from starting
            log.warning("scorer warm-up failed (the first batch will be slower): %s", exc)
            return
        ms = round((time.perf_counter() - started) * 1000, 1)
        log.info("scorer warmed up", extra={"fields": {"records": len(values), "ms": ms}})

    def _maybe_switch_model(self) -> None:
        """At a batch boundary: is another version active now? Then score with it from here."""
        if time.monotonic() - self._last_model_poll < self.cfg.serve.model_poll_s:
            return
        self._last_model_poll = time.monotonic()
        try:
            record = self.store.active_model_version(self.pipeline)
        except RetryableStorageError:
            return  # the batch write will notice and wait
        if record is None or self.loaded is None or record.version == self.loaded.version:
            return
        try:
            self._load_model()
        except Exception as exc:
            # A broken bundle must not stop the service: keep scoring with the current one.
            log.error(
                "cannot switch model version, keeping the current one",
                extra={"fields": {"version": record.version, "error": str(exc)}},
            )


def typical_records(model: Any, schema: Any, n: int) -> Any:
    """``n`` made-up records from what the model learned: each numeric feature swept from 10
    scales below its training median to 10 above (so some rows alert and are explained too),
    each categorical one at its first known category."""
    import pandas as pd

    pre = model.preprocessor_
    sweep = np.linspace(-10.0, 10.0, n)
    data: dict[str, Any] = {schema.id_field: [f"warm-up-{i}" for i in range(n)]}
    if schema.time_field:
        data[schema.time_field] = pd.Timestamp.now(tz="UTC")
    if schema.entity_field:
        data[schema.entity_field] = "warm-up"
    for name in pre.numeric_:
        params = pre.numeric_params_[name]
        data[name] = params.median + params.scale * sweep
    for name in pre.categorical_:
        data[name] = (pre.categories_[name] or ["warm-up"])[0]
    return pd.DataFrame(data)
