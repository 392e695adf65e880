"""``BatchScorer``: one call per micro-batch for the streaming service.

One pass per batch of ``batch_size`` rows runs every detector under ``torch.inference_mode()``.
On CUDA the host batch is pinned and copied with ``non_blocking=True``; ``bf16=True`` runs the
networks under bfloat16 autocast (scores are returned as float64 either way).

On the CPU the per-row steps around the networks (preprocessing, conformal p-values, the
ensemble) are vectorised numpy. On CUDA they run as torch ops on the GPU too
(``anomaly.scoring.device_scoring``): on the host they run at ~1.5M rows/s for 30 features, which
would cap scoring there however fast the GPU's networks; ``device_steps`` chooses explicitly.
The explanations are built only for alert rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from anomaly.estimator import explain
from anomaly.estimator.detectors._base import resolve_device
from anomaly.estimator.model import SCORE_COLUMNS, AnomalyModel, score_frame
from anomaly.features.columns import to_frame
from anomaly.scoring.device_scoring import DeviceScorer, host_inputs


class EmulatedBf16Warning(RuntimeWarning):
    """bf16 autocast asked for on a CPU that has no bfloat16 instructions."""


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16 or AMX); None when this torch
    build cannot tell. oneDNN's own answer (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is
    True on any AVX512 CPU, where it converts in software: bf16 autocast ran at 0.6x of float32
    on such a Xeon, so it is not the question that matters here."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return None


@dataclass
class ScoredBatch:
    scores: pd.DataFrame  # columns as AnomalyModel.score_detectors
    is_alert: np.ndarray  # bool, ensemble_p <= target_fpr
    severity: np.ndarray  # object: "low"|"medium"|"high"|"critical", None where not an alert
    # Per row, as tuples: the rows where nothing fired or nothing is explained (nearly all of
    # them) share one empty tuple instead of each holding a new list. Allocating 2 x n small
    # lists per batch made the cyclic GC walk every object torch and pandas hold (~2 ms a batch).
    fired: list[tuple[str, ...]]  # detectors whose own p-value <= target_fpr
    top_features: list[tuple[dict[str, Any], ...]]  # explanations for alert rows, () elsewhere
    # The columns of ``scores`` as arrays (the same memory): a frame's column lookup costs
    # ~25 us each, which a micro-batch would pay per column per batch.
    columns: dict[str, np.ndarray]
    # The checked numeric features the scoring read (rows x the preprocessor's numeric columns,
    # NaN where missing), for the drift monitor.
    numeric: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


class BatchScorer:
    def __init__(
        self,
        model: AnomalyModel,
        device: str = "auto",
        batch_size: int = 8192,
        bf16: bool = False,
        threads: int | None = 1,
        top: int = 3,
        device_steps: bool | None = None,
    ) -> None:
        # Checked here, where the argument is named: otherwise torch refuses threads=0 without
        # naming it, and batch_size < 1 fails deep in the scoring loop.
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1 (or None), got {threads}")
        model._check_fitted()
        self.model = model
        self._device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.bf16 = bool(bf16)
        self.top = top
        if threads is not None:
            # Set once here: the service's scoring thread keeps this for its lifetime.
            torch.set_num_threads(int(threads))
        model.threads = threads
        model.to(self._device)
        # None: on CUDA only (MPS has no float64; on the CPU numpy's grid searches are faster).
        if device_steps is None:
            device_steps = self._device.type == "cuda"
        self._device_scorer = DeviceScorer(model, self._device) if device_steps else None
        if self.bf16 and self._device.type == "cpu" and cpu_has_native_bf16() is False:
            warnings.warn(
                "bf16 autocast on this CPU is emulated (no AVX512-BF16 or AMX): scoring runs "
                "slower than float32 (~9x measured on an AVX2 machine, ~1.7x on an AVX512 one "
                "without AVX512-BF16); set serve.bf16: false here",
                EmulatedBf16Warning,
                stacklevel=2,
            )

    @property
    def device(self) -> str:
        return self._device.type

    def score(self, frame: Any) -> ScoredBatch:
        model = self.model
        frame = to_frame(frame, model.preprocessor_.feature_names_in_)
        n = len(frame)
        if n == 0:
            block = np.empty((len(SCORE_COLUMNS), 0))
            return ScoredBatch(
                score_frame(block), np.zeros(0, bool), np.empty(0, object), [], [],
                dict(zip(SCORE_COLUMNS, block, strict=True)),
                np.empty((0, len(model.preprocessor_.numeric_))),
            )  # fmt: skip
        if self._device_scorer is not None:
            numeric, codes = host_inputs(model.preprocessor_, frame)
            out = self._device_scorer.score(numeric, codes, self.batch_size, self.bf16)
            block = np.full((len(SCORE_COLUMNS), n), np.nan)
            for column, values_ in zip(out.columns, out.table.T, strict=True):
                block[SCORE_COLUMNS.index(column)] = values_
            ens_tail = out.ensemble_tail
        else:
            xp, numeric = model.preprocessor_.transform_with_numeric(frame)
            raw, errors = model._raw_scores(
                xp, numeric, batch_size=self.batch_size, bf16=self.bf16, want_errors=True
            )
            block, ens_tail = model._score_block(raw)
        columns = dict(zip(SCORE_COLUMNS, block, strict=True))
        alpha = model.target_fpr
        is_alert = columns["ensemble_p"] <= alpha
        severity = model.calibrators_["ensemble"].severity(ens_tail, is_alert)
        # Which detectors fired, as a bit pattern per row, then one shared tuple per pattern,
        # without looking at rows where none fired.
        bits = np.zeros(n, dtype=np.int64)
        for i, name in enumerate(model.detectors_):
            bits |= (columns[f"{name}_p"] <= alpha).astype(np.int64) << i
        patterns = [
            tuple(name for i, name in enumerate(model.detectors_) if code >> i & 1)
            for code in range(1 << len(model.detectors_))
        ]
        fired: list[tuple[str, ...]] = [()] * n
        for r in np.flatnonzero(bits).tolist():
            fired[r] = patterns[bits[r]]
        top_features: list[tuple[dict[str, Any], ...]] = [()] * n
        alert_rows = np.flatnonzero(is_alert)
        if len(alert_rows):
            if self._device_scorer is not None:
                take = torch.from_numpy(alert_rows).to(out.inputs.device)
                xa = out.inputs[take].cpu().numpy()
                err = out.errors[take].cpu().numpy() if out.errors is not None else None
            else:
                xa = xp[alert_rows]
                err = errors[alert_rows] if errors is not None else None
            contrib = model._feature_contributions(xa, err)
            names = model.preprocessor_.feature_names_in_
            explained = explain.top_features(frame, names, contrib, alert_rows, self.top)
            for r, items in zip(alert_rows, explained, strict=True):
                top_features[r] = tuple(items)
        return ScoredBatch(
            score_frame(block), is_alert, severity, fired, top_features, columns, numeric
        )
