"""Per-row scoring steps in torch, on the scoring device: for GPUs.

On a GPU the three networks take a few nanoseconds per row, so the numpy steps around them on
the host (quantile transform ~0.5 us per row for 30 features, conformal p-values, the ensemble)
would cap scoring near 2M rows/s. Here the same steps run as torch ops on the device: the host
only validates the numeric block (the errors must name a column and row), looks up category codes
(strings live on the host) and copies one float64 block over; one table of scores and p-values
comes back.

The arithmetic mirrors ``Preprocessor`` and ``Calibrator`` operation for operation, in float64:
``torch.searchsorted`` finds the same positions as ``np.searchsorted`` (and so as the exact grid
searches of ``anomaly.features.knot_lookup``), and the interpolation and tail formulas are the same
expressions. On the CPU this path therefore gives the numpy path's results (tests check it); on a
GPU they match within rounding of the transcendental functions.

Float64 is needed (knots and calibration scores are float64 and p-values hinge on exact
comparisons), so MPS, which has no float64, keeps the numpy path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anomaly.estimator.calibration import Calibrator
from anomaly.features.knot_lookup import segment_slopes
from anomaly.features.preprocess import Preprocessor


@dataclass
class _NumericTables:
    """Per numeric column, padded to the longest knot list (``k`` columns x ``K`` knots)."""

    median: torch.Tensor  # (k, 1)
    scale: torch.Tensor  # (k, 1)
    quantile: torch.Tensor  # (k, 1) bool: quantile transform (else robust / signed log)
    knots: torch.Tensor  # (k, K), +inf after a column's last knot
    normal: torch.Tensor  # (k, K)
    slope: torch.Tensor  # (k, K)
    first: torch.Tensor  # (k, 1) first knot
    last: torch.Tensor  # (k, 1) last knot
    normal_first: torch.Tensor  # (k, 1)
    normal_last: torch.Tensor  # (k, 1)
    max_segment: torch.Tensor  # (k, 1) int64: index of the last knot segment (len - 2)


class DevicePreprocessor:
    """``Preprocessor.transform`` for a validated numeric block and category codes, in torch."""

    def __init__(self, pre: Preprocessor, device: torch.device) -> None:
        pre._check_fitted()
        self.device = device
        self.clip = float(pre.clip)
        self.kind = pre.numeric_transform
        params = [pre.numeric_params_[name] for name in pre.numeric_]
        k = len(params)
        width = max([len(p.knots) for p in params] + [2])
        knots = np.full((k, width), np.inf)
        normal = np.zeros((k, width))
        slope = np.zeros((k, width))
        quantile = np.zeros((k, 1), dtype=bool)
        ends = np.zeros((k, 4))
        max_segment = np.zeros((k, 1), dtype=np.int64)
        for i, p in enumerate(params):
            if self.kind == "quantile" and len(p.knots) > 1:
                kn, nv = np.asarray(p.knots, np.float64), np.asarray(p.normal, np.float64)
                quantile[i] = True
                knots[i, : len(kn)] = kn
                normal[i, : len(nv)] = nv
                # The slope of each segment as KnotLookup computes it (the same function: a
                # segment too narrow for a finite slope gets 0, never inf).
                slope[i, : len(kn)] = segment_slopes(kn, nv)
                ends[i] = (kn[0], kn[-1], nv[0], nv[-1])
                max_segment[i] = len(kn) - 2
        as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        self.tables = _NumericTables(
            median=as_t(np.array([[p.median] for p in params], np.float64).reshape(k, 1)),
            scale=as_t(np.array([[p.scale] for p in params], np.float64).reshape(k, 1)),
            quantile=as_t(quantile),
            knots=as_t(knots),
            normal=as_t(normal),
            slope=as_t(slope),
            first=as_t(ends[:, 0:1].copy()),
            last=as_t(ends[:, 1:2].copy()),
            normal_first=as_t(ends[:, 2:3].copy()),
            normal_last=as_t(ends[:, 3:4].copy()),
            max_segment=as_t(max_segment),
        )
        self.any_quantile = bool(quantile.any())
        self.all_quantile = bool(quantile.all())
        # One-hot layout: first output column of each categorical feature's block, its last
        # (the unseen bucket), and the value each category code sets there.
        self.category_blocks = []
        col = k
        for name in pre.categorical_:
            last = col + len(pre.categories_[name])
            self.category_blocks.append((col, last, as_t(pre.one_hot_values_[name])))
            col = last + 1
        self.n_out = pre.n_features_out_
        self._pre = pre
        self._linear: tuple[torch.Tensor, ...] | None = None

    def linear_view(self, values: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
        """``Preprocessor.linear_view`` of the rows ``transform`` made ``xp`` from."""
        if self._linear is None:
            plan = self._pre.linear_plan()
            self._linear = tuple(
                torch.as_tensor(a, device=self.device)
                for a in (plan.columns, plan.median, plan.mean, plan.std)
            )
        columns, median, mean, std = self._linear
        if not len(columns):
            return xp
        v = values[:, columns]
        v = torch.where(torch.isnan(v), median, v)
        out = xp.clone()
        out[:, columns] = ((v - mean) / std).clamp_(-self.clip, self.clip).float()
        return out

    def numeric(self, values: torch.Tensor) -> torch.Tensor:
        """Validated float64 block ``(n, k)`` with NaN for missing -> transformed ``(k, n)``."""
        t = self.tables
        x = values.t()  # (k, n): one row per column, as searchsorted wants
        x = torch.where(torch.isnan(x), t.median, x)
        if self.all_quantile:
            z = self._quantile(x)
        else:
            robust = (x - t.median) / t.scale
            if self.kind == "signed_log":
                robust = torch.sign(robust) * torch.log1p(torch.abs(robust))
            z = torch.where(t.quantile, self._quantile(x), robust) if self.any_quantile else robust
        return z.clamp_(-self.clip, self.clip)

    def _quantile(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tables
        inside = torch.minimum(torch.maximum(x, t.first), t.last)
        # +inf padding is above every clipped value, so 'right' counts only real knots.
        j = torch.searchsorted(t.knots, inside.contiguous(), right=True)
        j = torch.minimum((j - 1).clamp_(min=0), t.max_segment)
        z = t.normal.gather(1, j) + (inside - t.knots.gather(1, j)) * t.slope.gather(1, j)
        # Beyond the knots: a log1p tail in units of the column's robust scale, as the host does.
        z = torch.where(x > t.last, t.normal_last + torch.log1p((x - t.last) / t.scale), z)
        return torch.where(x < t.first, t.normal_first - torch.log1p((t.first - x) / t.scale), z)

    def transform(self, values: torch.Tensor, codes: list[torch.Tensor]) -> torch.Tensor:
        """Float32 ``(n, n_features_out_)`` matrix, as ``Preprocessor.transform`` returns."""
        n = values.shape[0]
        out = torch.zeros((n, self.n_out), dtype=torch.float32, device=self.device)
        k = values.shape[1]
        if k:
            out[:, :k] = self.numeric(values).t()
        rows = torch.arange(n, device=self.device)
        for (offset, last, values_of_code), code in zip(self.category_blocks, codes, strict=True):
            out[rows, (offset + code).clamp_(max=last)] = values_of_code[code]
        return out


def host_inputs(pre: Preprocessor, data: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """The host's part of ``Preprocessor.transform``: the checked numeric block (float64, NaN
    where missing) and the category codes, with the same errors."""
    frame = pre.checked_frame(data)
    return pre.checked_numeric(frame), pre.category_codes(frame)


class DeviceCalibrator:
    """``Calibrator.pvalues`` / ``tail_pvalues`` in torch float64."""

    def __init__(self, cal: Calibrator, device: torch.device) -> None:
        self.scores = torch.as_tensor(cal.scores_, dtype=torch.float64, device=device)
        self.n = cal.n_
        self.tail_m = cal.tail_m_
        self.tail_u = cal.tail_u_
        self.tail_beta = cal.tail_beta_

    def pvalues(self, s: torch.Tensor) -> torch.Tensor:
        count_ge = self.n - torch.searchsorted(self.scores, s)
        # Integer / float gives float32 in torch: divide in float64, as numpy does.
        return (count_ge + 1).double() / (self.n + 1.0)

    def tail_pvalues(self, s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        tail = (self.tail_m / (self.n + 1.0)) * torch.exp(-(s - self.tail_u) / self.tail_beta)
        p = torch.where(s > self.tail_u, torch.minimum(p, tail), p)
        return p.clamp(min=1e-300)


def combine(tails: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``anomaly.estimator.ensemble.combine`` in torch: weighted mean of ``-log10(p)`` over
    detectors."""
    stacked = torch.stack([p.clamp(min=1e-300) for p in tails])
    if len(set(weights)) == 1:
        return -torch.log10(stacked).mean(0)
    w = torch.tensor(weights, dtype=torch.float64, device=stacked.device)[:, None]
    return -(torch.log10(stacked) * w).sum(0) / w.sum()


@dataclass
class DeviceScores:
    """What one pass returns to the host: the score table and the alert rows' inputs."""

    table: np.ndarray  # (n, len(columns)) float64
    columns: list[str]
    ensemble_tail: np.ndarray  # tail-extended ensemble p-values (severities)
    inputs: torch.Tensor  # preprocessed rows, on the device (explanations take alert rows)
    errors: torch.Tensor | None  # the VAE's per-feature errors, on the device


class DeviceScorer:
    """Every per-row step of ``BatchScorer.score`` up to the score table, on ``device``."""

    def __init__(self, model, device: torch.device) -> None:  # model: AnomalyModel
        if device.type == "mps":
            raise ValueError("the device scoring path needs float64, which MPS lacks")
        self.model = model
        self.device = device
        self.pre = DevicePreprocessor(model.preprocessor_, device)
        self.calibrators = {
            name: DeviceCalibrator(model.calibrators_[name], device)
            for name in [*model.detectors_, "ensemble"]
        }

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def score(
        self, values: np.ndarray, codes: list[np.ndarray], batch_size: int, bf16: bool
    ) -> DeviceScores:
        """``values``: validated float64 numeric block (NaN = missing); ``codes``: per
        categorical feature, each row's code (``Preprocessor.category_codes``)."""
        from anomaly.estimator.detectors._base import finite_scores, torch_threads
        from anomaly.estimator.model import SCORE_COLUMNS

        model = self.model
        n = values.shape[0]
        with torch_threads(model.threads), torch.inference_mode():
            values_on_device = self._to_device(np.ascontiguousarray(values, dtype=np.float64))
            xp = self.pre.transform(
                values_on_device,
                [self._to_device(np.ascontiguousarray(c, dtype=np.int64)) for c in codes],
            )
            views = {"quantile": xp}
            if any(det.view == "linear" for det in model.detectors_.values()):
                views["linear"] = self.pre.linear_view(values_on_device, xp)
            raw = {
                name: torch.empty(n, dtype=torch.float64, device=self.device)
                for name in model.detectors_
            }
            errors = None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                for start in range(0, n, batch_size):
                    stop = min(start + batch_size, n)
                    for name, det in model.detectors_.items():
                        xb = views[det.view][start:stop]
                        if name == "vae":
                            score, e = det.score_with_errors(xb)
                            if errors is None:
                                errors = torch.empty(
                                    (n, e.shape[1]), dtype=torch.float32, device=self.device
                                )
                            errors[start:stop] = e
                        else:
                            score = finite_scores(det._score_tensor(xb))
                        raw[name][start:stop] = score
            columns = {}
            tails = []
            for name in model.detectors_:
                cal = self.calibrators[name]
                s = raw[name]
                p = cal.pvalues(s)
                columns[name], columns[f"{name}_p"] = s, p
                tails.append(cal.tail_pvalues(s, p))
            ens = combine(tails, model.ensemble_weights_)
            cal = self.calibrators["ensemble"]
            ens_p = cal.pvalues(ens)
            columns["ensemble"], columns["ensemble_p"] = ens, ens_p
            names = [c for c in SCORE_COLUMNS if c in columns]
            stacked = torch.stack([*(columns[c] for c in names), cal.tail_pvalues(ens, ens_p)], 1)
            host = stacked.cpu().numpy()
        return DeviceScores(host[:, :-1], names, host[:, -1].copy(), xp, errors)
