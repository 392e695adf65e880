"""Normalizing-flow detector built on zuko.

A masked autoregressive flow (``zuko.flows.MAF``, default) or a neural spline flow
(``zuko.flows.NSF``) is fit by maximum likelihood on the preprocessed normal rows. The score is the
negative log-likelihood ``-log p(x)`` in that space.

Finiteness: inputs are clamped to ``[-input_clip, input_clip]`` before the flow (the preprocessor
already bounds them), and any NaN/inf the flow could still produce is mapped to a large finite value
(``SCORE_CAP``, the most anomalous), so no non-finite score reaches calibration or a threshold.
During training a little Gaussian noise (``noise_std``) dequantises one-hot and discrete columns,
which would otherwise let the likelihood diverge on their exact values.
"""

from __future__ import annotations

from typing import Any

import torch
import zuko
from torch import nn

from anomaly.estimator.detectors._base import BaseDetector


class _Flow(nn.Module):
    def __init__(self, flow: nn.Module, input_clip: float, pad: int) -> None:
        super().__init__()
        self.flow = flow
        self.input_clip = input_clip
        self.pad = pad

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(-self.input_clip, self.input_clip)
        if self.pad:
            # zuko's autoregressive conditioner needs >= 2 features; a constant zero column adds a
            # constant to every log-likelihood and changes no ranking.
            x = torch.cat([x, x.new_zeros(x.shape[0], self.pad)], dim=1)
        return self.flow().log_prob(x)


class FlowDetector(BaseDetector):
    """Normalizing-flow anomaly detector (score = negative log-likelihood).

    Parameters (beyond the shared training ones): ``kind`` (``"maf"`` or ``"nsf"``),
    ``transforms`` (number of autoregressive transforms), ``hidden`` widths of each conditioner,
    ``bins`` (NSF only), ``noise_std`` (training dequantisation noise), ``input_clip``.

    Default width: conditioners of (32, 32) rather than (64, 64) score ~1.7x faster with the same
    mean ROC-AUC on the 14 benchmark datasets (89.2 both, flow alone, seeds 0-2; PR-AUC 67.3 vs
    68.2); two transforms instead of four gave 89.3 / 67.2 (bench/quality.py --detector-params).
    """

    name = "flow"

    def __init__(
        self,
        kind: str = "maf",
        transforms: int = 4,
        hidden: tuple[int, ...] = (32, 32),
        bins: int = 8,
        noise_std: float = 0.05,
        input_clip: float = 50.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if kind not in ("maf", "nsf"):
            raise ValueError(f"kind must be 'maf' or 'nsf', got {kind!r}")
        self.kind = kind
        self.transforms = transforms
        self.hidden = tuple(hidden)
        self.bins = bins
        self.noise_std = noise_std
        self.input_clip = input_clip

    def architecture(self) -> dict[str, Any]:
        return {"kind": self.kind, "transforms": self.transforms, "hidden": list(self.hidden)}

    def _build(self, n_features: int) -> nn.Module:
        pad = 1 if n_features < 2 else 0
        d = n_features + pad
        if self.kind == "maf":
            flow = zuko.flows.MAF(
                features=d, transforms=self.transforms, hidden_features=self.hidden
            )
        else:  # "nsf", the only other kind __init__ takes
            flow = zuko.flows.NSF(
                features=d, transforms=self.transforms, hidden_features=self.hidden, bins=self.bins
            )
        return _Flow(flow, self.input_clip, pad)

    def _loss(self, module: nn.Module, xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.noise_std > 0:
            xb = xb + torch.randn(xb.shape, generator=gen).to(xb.device) * self.noise_std
        return -module.log_prob(xb).mean()

    def _val_loss(self, module: nn.Module, xv: torch.Tensor) -> float:
        return float(-module.log_prob(xv).mean())

    def _score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return -self.module_.log_prob(x)
