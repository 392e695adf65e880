"""What the three detectors share: input checks, seeding, threads, the training loop.

The training loop is deliberately plain: shuffle with a seeded generator, Adam, a validation pass
every ``validate_every`` optimiser steps, early stopping that restores the best weights, and two
budgets (the step budget, which keeps results deterministic, and ``time_budget_s``, which does not).

Everything is counted in optimiser steps, never in epochs: on a few hundred rows an epoch is one or
two steps, so a patience in epochs ended training after a few dozen steps. The validation loss is
deterministic (each detector draws its noise from a generator seeded the same way at every
validation pass), so an improvement is a real one and not a luckier draw.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from anomaly.errors import DataError, DeviceError, NotFittedError

# Scores are capped here: finite, far beyond anything a calibration set produces.
SCORE_CAP = 1e30


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU. A device that cannot be used here raises
    ``DeviceError`` now, with the reason, rather than an AssertionError from deep inside torch
    at the first tensor moved there."""
    mps = getattr(torch.backends, "mps", None)
    mps_available = mps is not None and mps.is_available()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {device!r}: use auto, cpu, cuda (or cuda:N) or mps") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise DeviceError(
                f"device {device!r}: this torch ({torch.__version__}) is built without CUDA; "
                "use --device cpu or install a CUDA build of torch"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {device!r}: no CUDA GPU is visible to torch")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {device!r}: torch sees {count} CUDA GPU(s), 0-{count - 1}")
    elif dev.type == "mps" and not mps_available:
        raise DeviceError(f"device {device!r}: MPS (Apple GPU) is not available here")
    return dev


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``threads`` intra-op threads, restoring the previous setting."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_array(X: Any, n_features: int | None = None) -> np.ndarray:
    """A finite float32 2-D array, or a DataError that says what is wrong and where."""
    if hasattr(X, "to_numpy"):
        X = X.to_numpy()
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"input is not numeric: {exc}") from None
    if arr.ndim != 2:
        raise DataError(f"expected a 2-D array (rows x features), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError("input has no rows")
    if n_features is not None and arr.shape[1] != n_features:
        raise DataError(f"input has {arr.shape[1]} features, the detector was fit on {n_features}")
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"row {row}, feature f{col}: value is {arr[row, col]} (not finite)")
    return np.ascontiguousarray(arr)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's tensors live (parameters, else buffers: the knn detector has only a
    buffer)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """NaN and +inf become the cap (most anomalous), -inf the negative cap: never non-finite."""
    scores = scores.double()
    return torch.nan_to_num(scores, nan=SCORE_CAP, posinf=SCORE_CAP, neginf=-SCORE_CAP).clamp(
        -SCORE_CAP, SCORE_CAP
    )


class BaseDetector:
    """Shared hyper-parameters and plumbing; subclasses build the network and the loss.

    Step budget: up to ``max_steps`` optimiser steps (``max_epochs``, when set, also caps the
    passes over the training rows, but never below ``min_steps`` steps, so small data still
    trains). Early stopping never ends training before ``min_steps``; after that it stops once
    ``patience`` steps have passed without the validation loss improving, and the best weights
    are restored in any case. ``time_budget_s`` can stop training sooner (not deterministic).

    Why the validation loss decides, not a number of passes: until 2026-12-06 the default was
    60 passes, at least 1,000 and at most 1,500 steps, so every dev set of ``bench/quality.py``
    (at most 5,000 training rows: under 1,000 steps in 60 passes) trained exactly 1,000 steps
    and early stopping never acted. With up to 5,000 steps and early stopping after 1,000, the
    same splits and seeds (23 sets, seeds 0-2; the 19 sets with generative fits), mean ROC-AUC
    x100 alone: VAE 85.6 -> 86.9, flow 86.9 -> 87.8, GAN 85.3 -> 85.7; most fits stop early
    (VAE 39 of 57, flow 53, GAN 49). The VAE and the flow are fit by maximum likelihood, and
    their validation loss is a held-out likelihood (a bound on it, for the VAE): stopping where
    it stops improving is model selection on held-out rows, not a guess at the epoch count.
    """

    name = "base"
    # True for a detector that trains nothing (knn): AnomalyModel then fits it on the calibration
    # rows as well and calibrates it on its ``leave_one_out_scores`` of them.
    uses_calibration_rows = False
    # Which view of the preprocessed rows the detector reads: "quantile" (the preprocessor's
    # output) or "linear" (``Preprocessor.linear_view``: numeric columns as plain z-scores).
    view = "quantile"

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int | None = 5000,
        min_steps: int = 1000,
        time_budget_s: float | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        validation_fraction: float = 0.1,
        patience: int = 300,
        validate_every: int = 25,
        seed: int = 0,
        threads: int | None = 1,
        progress: bool = False,
        device: str = "cpu",
        score_batch_size: int = 8192,
    ) -> None:
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.min_steps = min_steps
        self.time_budget_s = time_budget_s
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.validate_every = validate_every
        self.seed = seed
        self.threads = threads
        self.progress = progress
        self.device = device
        self.score_batch_size = score_batch_size

    # ---- subclass hooks
    def _build(self, n_features: int) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _loss(self, module: torch.nn.Module, xb: torch.Tensor, gen: torch.Generator) -> Any:
        raise NotImplementedError  # pragma: no cover - abstract

    def _val_loss(self, module: torch.nn.Module, xv: torch.Tensor) -> float:
        raise NotImplementedError  # pragma: no cover - abstract

    def _score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def architecture(self) -> dict[str, Any]:
        """Hyper-parameters needed to rebuild the network (saved in bundles)."""
        raise NotImplementedError  # pragma: no cover - abstract

    # ---- public API
    def get_params(self) -> dict[str, Any]:
        import inspect

        names = []
        for cls in type(self).__mro__:
            if cls is object:
                continue
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    names.append(p.name)
        return {n: getattr(self, n) for n in dict.fromkeys(names)}

    def fit(self, X: Any, y: Any = None) -> BaseDetector:
        """Train on normal rows only (already preprocessed: finite, roughly standardised)."""
        arr = check_array(X)
        n = arr.shape[0]
        min_rows = 10
        if n < min_rows:
            raise DataError(f"only {n} rows to fit the {self.name} detector; need >= {min_rows}")
        device = resolve_device(self.device)
        self.n_features_in_ = arr.shape[1]
        with torch_threads(self.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            gen = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(n, generator=gen).numpy()
            n_val = max(1, round(n * self.validation_fraction))
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            x_train = torch.from_numpy(arr[train_idx]).to(device)
            x_val = torch.from_numpy(arr[val_idx]).to(device)
            module = self._build(arr.shape[1]).to(device)
            self.module_ = module
            self._before_training(x_train, gen)
            self._train(module, x_train, x_val, gen)
            self.module_.eval()
            with torch.inference_mode():
                self._after_training(x_train, x_val)
        return self

    def _before_training(self, x_train: torch.Tensor, gen: torch.Generator) -> None:
        """Hook for data-dependent state (e.g. bounding boxes); default nothing."""

    def _after_training(self, x_train: torch.Tensor, x_val: torch.Tensor) -> None:
        """Hook for state learned from the trained network (e.g. score scales); default nothing."""

    def _validation_generator(self) -> torch.Generator:
        """The same noise at every validation pass of a fit, so validation losses compare."""
        return torch.Generator().manual_seed(self.seed + 1)

    def _optimizers(self, module: torch.nn.Module) -> list[torch.optim.Optimizer]:
        return [adam(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)]

    def _batch_size(self, n: int) -> int:
        """Large data sets train with up to 4x ``batch_size`` (about n/64 rows per step): per-step
        overhead dominates small CPU batches, so this cuts fit time several-fold."""
        return int(max(1, min(n, max(self.batch_size, min(4 * self.batch_size, n // 64)))))

    def planned_steps(self, n: int) -> int:
        """Optimiser steps a fit on ``n`` training rows takes unless stopped early."""
        if self.max_epochs is None:
            if self.max_steps is None:
                raise ValueError("max_epochs and max_steps cannot both be None")
            return max(1, self.max_steps)
        steps_per_epoch = math.ceil(n / self._batch_size(n))
        steps = max(self.max_epochs * steps_per_epoch, self.min_steps)
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        return max(1, steps)

    def _step(self, module: torch.nn.Module, opts: list, xb: torch.Tensor, gen) -> float:
        opt = opts[0]
        opt.zero_grad(set_to_none=True)
        loss = self._loss(module, xb, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0)
        opt.step()
        return float(loss.detach())

    def _batches(self, n: int, bs: int, gen: torch.Generator, device) -> Iterator[torch.Tensor]:
        """Row indices of successive mini-batches, reshuffled after every pass over the data."""
        while True:
            order = torch.randperm(n, generator=gen).to(device)
            for start in range(0, n, bs):
                yield order[start : start + bs]

    def _train(
        self, module: torch.nn.Module, x_train: torch.Tensor, x_val: torch.Tensor, gen
    ) -> None:
        opts = self._optimizers(module)
        n = x_train.shape[0]
        bs = self._batch_size(n)
        planned = self.planned_steps(n)
        best = math.inf
        best_state: dict[str, torch.Tensor] | None = None
        best_step = 0
        start = time.monotonic()
        history: list[dict[str, float]] = []
        every = max(1, min(self.validate_every, planned))
        self.stop_reason_ = "max_steps"
        batches = self._batches(n, bs, gen, x_train.device)
        bar = tqdm(total=planned, desc=f"{self.name}", disable=not self.progress, leave=False)
        total, count = 0.0, 0
        for step in range(1, planned + 1):
            module.train()
            total += self._step(module, opts, x_train[next(batches)], gen)
            count += 1
            bar.update(1)
            if step % every and step != planned:
                continue
            module.eval()
            with torch.no_grad():
                val = self._val_loss(module, x_val)
            history.append({"step": step, "train_loss": total / count, "val_loss": val})
            bar.set_postfix(loss=f"{total / count:.4f}", val=f"{val:.4f}")
            total, count = 0.0, 0
            if val < best - 1e-4 * max(1.0, abs(best)) or best_state is None:
                best, best_step = val, step
                best_state = copy.deepcopy(module.state_dict())
            elif step >= self.min_steps and step - best_step >= self.patience:
                self.stop_reason_ = "early_stopping"
                break
            if self.time_budget_s is not None and time.monotonic() - start > self.time_budget_s:
                self.stop_reason_ = "time_budget"
                break
        bar.close()
        if best_state is not None:
            module.load_state_dict(best_state)
        self.history_ = history
        self.best_val_loss_ = best
        self.n_steps_ = step  # (planned_steps is at least 1: the loop ran)
        self.best_step_ = best_step
        self.n_epochs_ = math.ceil(step * bs / n)
        self.fit_seconds_ = time.monotonic() - start

    def leave_one_out_scores(self, X: Any, rows: np.ndarray) -> np.ndarray:
        """Scores of the fit rows at positions ``rows``, each left out of what scores it: only
        for detectors with ``uses_calibration_rows``."""
        raise NotImplementedError(f"the {self.name} detector scores no rows leave-one-out")

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError(f"the {self.name} detector is not fitted yet: call fit() first")

    def decision_function(self, X: Any) -> np.ndarray:
        """Anomaly score per row (float64, finite); higher means more anomalous."""
        self._check_fitted()
        arr = check_array(X, self.n_features_in_)
        device = module_device(self.module_)
        out = []
        with torch_threads(self.threads), torch.inference_mode():
            for start in range(0, arr.shape[0], self.score_batch_size):
                xb = torch.from_numpy(arr[start : start + self.score_batch_size]).to(device)
                out.append(finite_scores(self._score_tensor(xb)).cpu().numpy())
        return np.concatenate(out)

    # ---- bundles
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything learned, as named tensors (weights and buffers) for safetensors."""
        self._check_fitted()
        return {k: v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}

    def extra_state(self) -> dict[str, Any]:
        """Learned non-tensor state (JSON-safe)."""
        return {}

    @classmethod
    def from_state(
        cls,
        params: dict[str, Any],
        n_features: int,
        tensors: dict[str, torch.Tensor],
        extra: dict[str, Any] | None = None,
    ) -> BaseDetector:
        det = cls(**params)
        det.n_features_in_ = n_features
        # Before the build: the knn detector's extra state sizes its module.
        det._restore_extra(extra or {})
        module = det._build(n_features)
        expected = module.state_dict()
        if set(expected) != set(tensors):
            missing = sorted(set(expected) - set(tensors))[:5]
            unexpected = sorted(set(tensors) - set(expected))[:5]
            raise ValueError(f"tensor names differ: missing {missing}, unexpected {unexpected}")
        for key, ref in expected.items():
            got = tensors[key]
            if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
                raise ValueError(
                    f"tensor '{key}' has shape {tuple(got.shape)} {got.dtype}, "
                    f"expected {tuple(ref.shape)} {ref.dtype}"
                )
        module.load_state_dict(tensors, strict=True)
        module.eval()
        det.module_ = module
        return det

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        """Inverse of ``extra_state``."""


def adam(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """Adam, fused where this torch build supports it (fewer kernel launches per step)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **kwargs)


def mlp(sizes: list[int]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.SiLU())
    return torch.nn.Sequential(*layers)
