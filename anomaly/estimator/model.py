"""``AnomalyModel``: preprocessing, the detectors, calibration and the ensemble in one object.

Fitting splits the normal rows (seeded) into a training part and a calibration part
(``calibration_fraction``, default 0.25). The preprocessor and the trained detectors see only the
training part (each holds out a further validation split of it for early stopping); the knn
detector, which trains nothing, keeps both parts as reference rows and scores the calibration rows
leave-one-out (``anomaly.estimator.detectors.knn``). The calibration part turns every detector's
score into a conformal p-value and calibrates the ensemble (see
``anomaly.estimator.calibration`` and ``anomaly.estimator.ensemble``). ``predict`` alerts when
``ensemble_p <= target_fpr``.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from anomaly.config import PipelineConfig, SchemaConfig
from anomaly.errors import ConfigError, DataError, NotFittedError, one_line
from anomaly.estimator.calibration import Calibrator
from anomaly.estimator.detectors._base import (
    BaseDetector,
    finite_scores,
    resolve_device,
    torch_threads,
)
from anomaly.estimator.detectors.registry import (
    ALL_DETECTORS,
    check_detector_params,
    detector_class,
)
from anomaly.estimator.ensemble import NEIGHBOURHOOD, combine, member_weights
from anomaly.estimator.explain import feature_shares, top_features
from anomaly.features.columns import to_frame
from anomaly.features.numeric import ConstantColumnWarning
from anomaly.features.preprocess import Preprocessor

if TYPE_CHECKING:
    from os import PathLike

SCORE_COLUMNS = [
    *ALL_DETECTORS,
    "ensemble",
    *(f"{name}_p" for name in ALL_DETECTORS),
    "ensemble_p",
]
MIN_TRAINING_ROWS = 20
# Below this many normal rows the fit goes ahead with a SmallDataWarning (see ``fit``).
SMALL_DATA_ROWS = 200


class SmallDataWarning(UserWarning):
    """Few normal rows: the detectors fit, but calibration can promise little."""


def score_frame(block: np.ndarray) -> pd.DataFrame:
    """The score table from ``_score_block``'s ``(len(SCORE_COLUMNS), n)`` block, without a
    copy: pandas keeps a frame's float columns as one such block."""
    return pd.DataFrame(block.T, columns=SCORE_COLUMNS, copy=False)


def frame_fingerprint(frame: pd.DataFrame, columns: list[str]) -> str:
    """sha256 over the feature columns' values (row order matters), for the bundle manifest."""
    h = hashlib.sha256()
    h.update(",".join(columns).encode())
    hashed = pd.util.hash_pandas_object(frame[columns].astype(str), index=False).to_numpy()
    h.update(hashed.tobytes())
    return h.hexdigest()


class AnomalyModel:
    """VAE + flow + GAN + nearest neighbours (in two views) fit on normal rows, calibrated to
    ``target_fpr``.

    Parameters
    ----------
    target_fpr: false-positive rate of the alert rule on normal rows (default 0.001).
    seed: seeds the data split and every detector (training is deterministic on CPU).
    device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
    detectors: subset of ``("vae", "flow", "gan", "knn", "knn_linear")``.
    schema: feature columns (``None``: numpy input, every column numeric).
    numeric_transform: preprocessing of numeric columns (``"quantile"``, ``"robust"``,
        ``"signed_log"``); see ``anomaly.features.preprocess``.
    calibration_fraction: share of the normal rows held out for calibration.
    max_epochs / min_steps / max_steps / time_budget_s / batch_size: training budgets for each
        detector (see ``anomaly.estimator.detectors._base.BaseDetector``).
    threads: torch intra-op threads while fitting and scoring.
    progress: tqdm progress bars with the loss.
    detector_params: per-detector keyword overrides, e.g. ``{"flow": {"kind": "nsf"}}``.
    min_generative_rows: with fewer normal rows than this, and a neighbour detector (knn,
        knn_linear) among ``detectors``, the generative detectors (VAE, flow, GAN) are left out
        of the fit with a ``SmallDataWarning`` and the neighbour detectors score alone
        (``detectors_`` holds what was fit). A density model learnt by gradient descent from a
        few dozen rows describes those rows, not the normal state; a neighbour distance needs
        no fit. 0 fits them anyway.
    """

    def __init__(
        self,
        target_fpr: float = 0.001,
        seed: int = 0,
        device: str = "auto",
        *,
        detectors: tuple[str, ...] | list[str] = ALL_DETECTORS,
        schema: SchemaConfig | None = None,
        numeric_transform: str = "quantile",
        calibration_fraction: float = 0.25,
        max_epochs: int | None = None,
        max_steps: int | None = 5000,
        min_steps: int = 1000,
        time_budget_s: float | None = None,
        batch_size: int = 256,
        threads: int | None = 1,
        progress: bool = False,
        detector_params: dict[str, dict[str, Any]] | None = None,
        min_generative_rows: int = SMALL_DATA_ROWS,
    ) -> None:
        if not 0.0 < target_fpr < 0.5:
            raise ValueError(f"target_fpr must be in (0, 0.5), got {target_fpr}")
        unknown = set(detectors) - set(ALL_DETECTORS)
        if unknown or not detectors:
            raise ValueError(f"detectors must be a non-empty subset of {ALL_DETECTORS}")
        if not 0.0 < calibration_fraction < 1.0:
            raise ValueError("calibration_fraction must be in (0, 1)")
        self.target_fpr = target_fpr
        self.seed = seed
        self.device = device
        self.detectors = tuple(d for d in ALL_DETECTORS if d in detectors)
        self.schema = schema
        self.numeric_transform = numeric_transform
        self.calibration_fraction = calibration_fraction
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.min_steps = min_steps
        self.time_budget_s = time_budget_s
        self.batch_size = batch_size
        self.threads = threads
        self.progress = progress
        self.detector_params = detector_params or {}
        for name, params in self.detector_params.items():
            if name not in ALL_DETECTORS:
                known = ", ".join(ALL_DETECTORS)
                raise ValueError(f"detector_params: unknown detector '{name}' (known: {known})")
            unknown = sorted(set(params) - set(detector_class(name)().get_params()))
            if unknown:
                names = ", ".join(unknown)
                raise ValueError(f"detector_params.{name}: unknown parameter(s) {names}")
        self.min_generative_rows = min_generative_rows
        self._version: str | None = None

    @classmethod
    def from_config(cls, cfg: PipelineConfig, **overrides: Any) -> AnomalyModel:
        m = cfg.model
        # Each field of the model section is the parameter of the same name.
        kwargs: dict[str, Any] = {f.name: getattr(m, f.name) for f in fields(m)}
        kwargs.update(detectors=tuple(m.detectors), schema=cfg.schema)
        kwargs.update(overrides)
        check_detector_params(kwargs["detector_params"])
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            # A value the config loader does not check (an override, or a config built in
            # code): still one line, naming the model section.
            raise ConfigError(f"model: {one_line(exc)}") from exc

    # ------------------------------------------------------------------ version
    @property
    def version(self) -> str | None:
        """A string naming this model: what was set explicitly, else the bundle manifest's
        sha256 prefix (after save/load), else ``unsaved-<training-data fingerprint prefix>``
        after fit (``None`` before fit)."""
        if self._version is not None:
            return self._version
        return getattr(self, "_bundle_version", None)

    @version.setter
    def version(self, value: str | None) -> None:
        self._version = value

    # ---------------------------------------------------------------------- fit
    def _detector(self, name: str) -> BaseDetector:
        params: dict[str, Any] = {
            "seed": self.seed,
            "threads": self.threads,
            "progress": self.progress,
            "device": str(self.device_),
            "max_epochs": self.max_epochs,
            "max_steps": self.max_steps,
            "min_steps": self.min_steps,
            "time_budget_s": self.time_budget_s,
            "batch_size": self.batch_size,
        }
        params.update(self.detector_params.get(name, {}))
        return detector_class(name)(**params)

    def fit(self, X: Any, y: Any = None) -> AnomalyModel:
        """Fit on normal rows only (DataFrame per the schema, or a numpy array)."""
        started = time.monotonic()
        names = self.schema.features if self.schema is not None and self.schema.features else None
        frame = to_frame(X, names)
        # Validate the whole input first, so error messages name rows of what the user passed
        # (warnings come once, from the fit on the training part below).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantColumnWarning)
            Preprocessor(self.schema, self.numeric_transform, min_rows=1).fit(frame)
        n = len(frame)
        if n < MIN_TRAINING_ROWS:
            raise DataError(
                f"only {n} normal rows; at least {MIN_TRAINING_ROWS} are needed to train and "
                "calibrate (and about 4/target_fpr for alerts at target_fpr)"
            )
        n_cal = max(10, round(n * self.calibration_fraction))
        if n < SMALL_DATA_ROWS:
            warnings.warn(
                f"only {n} normal rows: the detectors train on {n - n_cal} and {n_cal} calibrate "
                f"them, so no p-value is below 1/{n_cal + 1} = {1 / (n_cal + 1):.3g} (alerts at "
                f"target_fpr={self.target_fpr:g} need about {int(np.ceil(1 / self.target_fpr))} "
                "calibration rows) and the false-positive rate is kept only on average over "
                "calibration draws, with wide swings from one fit to the next; the scores still "
                "rank rows",
                SmallDataWarning,
                stacklevel=2,
            )
        names = self._detectors_for(n)
        self.device_ = resolve_device(self.device)
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(n)
        cal_idx, train_idx = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        train_frame = frame.iloc[train_idx]
        cal_frame = frame.iloc[cal_idx]
        # The training part of the smallest allowed fit (20 rows, 10 of them calibrating).
        self.preprocessor_ = Preprocessor(self.schema, self.numeric_transform, min_rows=10).fit(
            train_frame
        )
        detectors = {name: self._detector(name) for name in names}
        # Each view of the rows the detectors read, built once: training, calibration.
        train_views, cal_views = (
            self._views(detectors.values(), *self.preprocessor_.transform_with_numeric(part))
            for part in (train_frame, cal_frame)
        )
        self.detectors_: dict[str, BaseDetector] = {}
        cal_scores = {}
        for name, det in detectors.items():
            x_train, x_cal = train_views[det.view], cal_views[det.view]
            if det.uses_calibration_rows:
                self.detectors_[name] = det.fit(np.concatenate([x_train, x_cal]))
                cal_rows = np.arange(len(x_train), len(x_train) + len(x_cal))
                cal_scores[name] = det.leave_one_out_scores(x_cal, cal_rows)
            else:
                self.detectors_[name] = det.fit(x_train)
                cal_scores[name] = det.decision_function(x_cal)
        self._calibrate(cal_scores)
        self.n_features_in_ = len(self.preprocessor_.feature_names_in_)
        self.feature_names_in_ = list(self.preprocessor_.feature_names_in_)
        self.training_ = {
            "rows": n,
            "n_train": len(train_idx),
            "n_calibration": len(cal_idx),
            "fingerprint": frame_fingerprint(frame, self.feature_names_in_),
            "fit_seconds": round(time.monotonic() - started, 3),
            "detectors": {
                name: {
                    "epochs": det.n_epochs_,
                    "stop_reason": det.stop_reason_,
                    "best_val_loss": det.best_val_loss_,
                    "fit_seconds": round(det.fit_seconds_, 3),
                }
                for name, det in self.detectors_.items()
            },
        }
        self._bundle_version = f"unsaved-{self.training_['fingerprint'][:8]}"
        return self

    def _detectors_for(self, n: int) -> tuple[str, ...]:
        """The detectors a fit on ``n`` normal rows trains (``min_generative_rows``)."""
        kept = tuple(d for d in self.detectors if d in NEIGHBOURHOOD)
        if n >= self.min_generative_rows or not kept:
            return self.detectors
        left_out = [d for d in self.detectors if d not in kept]
        if left_out:
            warnings.warn(
                f"only {n} normal rows (min_generative_rows={self.min_generative_rows}): the "
                f"{', '.join(left_out)} detector(s) are left out and the neighbour "
                f"detector(s) {', '.join(kept)} score alone; pass min_generative_rows=0 to fit "
                "them anyway",
                SmallDataWarning,
                stacklevel=3,
            )
        return kept

    def _calibrate(self, raw: dict[str, np.ndarray]) -> None:
        self.calibrators_: dict[str, Calibrator] = {}
        tails = []
        for name in self.detectors_:
            cal = Calibrator(self.target_fpr).fit(raw[name], name=name)
            self.calibrators_[name] = cal
            tails.append(cal.tail_pvalues(raw[name], calibration_rows=True))
        self.ensemble_weights_ = member_weights(list(self.detectors_))
        ens = combine(tails, self.ensemble_weights_)
        self.calibrators_["ensemble"] = Calibrator(self.target_fpr).fit(ens, name="ensemble")

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "calibrators_"):
            raise NotFittedError("the model is not fitted yet: call fit() or AnomalyModel.load()")

    def to(self, device: str | torch.device) -> AnomalyModel:
        """Move every detector's network to ``device``."""
        self._check_fitted()
        dev = resolve_device(str(device))
        for det in self.detectors_.values():
            det.module_.to(dev)
            det.device = str(dev)
        self.device_ = dev
        return self

    def _raw_scores(
        self,
        xp: np.ndarray,
        numeric: np.ndarray,
        *,
        batch_size: int = 8192,
        bf16: bool = False,
        want_errors: bool = False,
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """All detectors on preprocessed rows ``xp`` (and ``numeric``, the numeric block
        ``transform_with_numeric`` returned with them, for the linear view), one pass per
        batch, under inference mode."""
        dev = self.device_
        cuda = dev.type == "cuda"
        views = self._views(self.detectors_.values(), xp, numeric)
        outs: dict[str, list[np.ndarray]] = {name: [] for name in self.detectors_}
        errs: list[np.ndarray] = []
        with (
            torch_threads(self.threads),
            torch.inference_mode(),
            torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            for start in range(0, xp.shape[0], batch_size):
                batch = {}
                for view, x in views.items():
                    xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
                    batch[view] = xb.pin_memory().to(dev, non_blocking=True) if cuda else xb.to(dev)
                for name, det in self.detectors_.items():
                    xb = batch[det.view]
                    if name == "vae" and want_errors:
                        score, e = det.score_with_errors(xb)  # type: ignore[attr-defined]
                        errs.append(e.float().cpu().numpy())
                    else:
                        score = finite_scores(det._score_tensor(xb))
                    outs[name].append(score.cpu().numpy())
        raw = {name: np.concatenate(v) if v else np.empty(0) for name, v in outs.items()}
        errors = np.concatenate(errs) if errs else None
        return raw, errors

    def _views(
        self, detectors: Iterable[BaseDetector], xp: np.ndarray, numeric: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The views of the preprocessed rows ``xp`` that ``detectors`` read (their ``view``):
        the rows themselves, and their linear view (from ``numeric``, the numeric block
        ``transform_with_numeric`` returned with them) when a detector reads it."""
        views = {"quantile": xp}
        if any(det.view == "linear" for det in detectors):
            views["linear"] = self.preprocessor_.linear_view(xp, numeric)
        return views

    def _score_block(self, raw: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and p-values per row as one ``(len(SCORE_COLUMNS), n)`` array, a row per column,
        and the ensemble's tail-extended p (for severities). The array becomes a DataFrame
        without a copy (a frame built from separate arrays copies them into one block, a fixed
        cost that shows in small micro-batches)."""
        n = len(next(iter(raw.values())))
        block = np.full((len(SCORE_COLUMNS), n), np.nan)
        row = dict(zip(SCORE_COLUMNS, block, strict=True))
        tails = []
        for name in self.detectors_:
            cal = self.calibrators_[name]
            row[name][:] = raw[name]
            row[f"{name}_p"][:] = p = cal.pvalues(raw[name])
            tails.append(cal.tail_pvalues(raw[name], pvalues=p))
        ens = combine(tails, self.ensemble_weights_)
        ens_cal = self.calibrators_["ensemble"]
        row["ensemble"][:] = ens
        row["ensemble_p"][:] = p = ens_cal.pvalues(ens)
        return block, ens_cal.tail_pvalues(ens, pvalues=p)

    def transform(self, X: Any) -> np.ndarray:
        self._check_fitted()
        return self.preprocessor_.transform(X)

    def score_detectors(self, X: Any) -> pd.DataFrame:
        """DataFrame: vae, flow, gan, ensemble and their p-values (NaN for disabled detectors)."""
        self._check_fitted()
        raw, _ = self._raw_scores(*self.preprocessor_.transform_with_numeric(X))
        return score_frame(self._score_block(raw)[0])

    def decision_function(self, X: Any) -> np.ndarray:
        """Ensemble score per row; higher = more anomalous."""
        return self.score_detectors(X)["ensemble"].to_numpy()

    def predict(self, X: Any) -> np.ndarray:
        """1 where ``ensemble_p <= target_fpr``, else 0."""
        return (self.score_detectors(X)["ensemble_p"].to_numpy() <= self.target_fpr).astype(int)

    @property
    def threshold_(self) -> float:
        """Ensemble score above which a row alerts (inf if unreachable)."""
        self._check_fitted()
        return self.calibrators_["ensemble"].threshold_

    # ---------------------------------------------------------------- explaining
    def _feature_contributions(self, xp: np.ndarray, errors: np.ndarray | None) -> np.ndarray:
        """Per input feature contribution, rows sum to 1. VAE error terms when the VAE is fit,
        else the knn detector's squared differences to the nearest reference row, else the
        squared preprocessed deviation from the training median."""
        if errors is None and "knn" in self.detectors_:
            errors = self.detectors_["knn"].feature_errors(xp)  # type: ignore[attr-defined]
        terms = errors if errors is not None else 0.5 * xp.astype(np.float64) ** 2
        pre = self.preprocessor_
        return feature_shares(terms, pre.output_source_, len(pre.feature_names_in_))

    def explain(self, X: Any, top: int = 3) -> list[list[dict[str, Any]]]:
        """For each row, the ``top`` input features that drove its score:
        ``[{"feature", "value", "contribution"}]``, contribution = share of the row's VAE
        reconstruction error (one-hot columns summed back into their categorical feature)."""
        self._check_fitted()
        frame = to_frame(X, self.preprocessor_.feature_names_in_)
        xp = self.preprocessor_.transform(frame)
        errors = None
        if "vae" in self.detectors_:
            errors = self.detectors_["vae"].feature_errors(xp)  # type: ignore[attr-defined]
        contrib = self._feature_contributions(xp, errors)
        names = self.preprocessor_.feature_names_in_
        return top_features(frame, names, contrib, np.arange(len(frame)), top)

    # ------------------------------------------------------------------ metrics
    @property
    def metrics_(self) -> dict[str, Any]:
        """What the model registry stores: target_fpr, threshold, calibration quantiles, ..."""
        self._check_fitted()
        ens = self.calibrators_["ensemble"]
        thr = ens.threshold_
        return {
            "target_fpr": self.target_fpr,
            "threshold": float(thr) if np.isfinite(thr) else None,
            "calibration_quantiles": ens.quantiles(),
            "detectors": list(self.detectors_),
            "n_calibration": ens.n_,
            "training": getattr(self, "training_", {}),
        }

    def schema_dict(self) -> dict[str, Any] | None:
        return asdict(self.schema) if self.schema is not None else None

    # ------------------------------------------------------------------ bundles
    def save(self, path: str | PathLike[str]) -> str:
        """Write a bundle directory; returns (and sets) the model version."""
        from anomaly.estimator.bundle import save_bundle

        return save_bundle(self, path)

    @classmethod
    def load(
        cls,
        path: str | PathLike[str],
        device: str = "cpu",
        *,
        expected_sha256: str | None = None,
        registered_as: str | None = None,
    ) -> AnomalyModel:
        """Load and verify a bundle (identity, hashes, shapes); raises BundleError if anything is
        off. ``expected_sha256``: the registered identity the bundle must have (see bundle.py)."""
        from anomaly.estimator.bundle import load_bundle

        return load_bundle(
            path, cls, device=device, expected_sha256=expected_sha256, registered_as=registered_as
        )
