"""anomaly-monitor core: preprocessing, the VAE / flow / GAN detectors, calibration, the ensemble,
model bundles and the batch scorer. Nothing here imports Kafka or SQL.

``AnomalyModel`` and the detectors are imported lazily so that ``import anomaly`` (and the CLI's
``--help``) does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anomaly.version import __version__

_LAZY = {
    "AnomalyModel": "anomaly.estimator.model",
    "VAEDetector": "anomaly.estimator.detectors.vae",
    "FlowDetector": "anomaly.estimator.detectors.flow",
    "GANDetector": "anomaly.estimator.detectors.gan",
    "Preprocessor": "anomaly.features.preprocess",
    "PipelineConfig": "anomaly.config",
    "load_config": "anomaly.config",
}

__all__ = [
    "AnomalyModel",
    "FlowDetector",
    "GANDetector",
    "PipelineConfig",
    "Preprocessor",
    "VAEDetector",
    "__version__",
    "load_config",
]

if TYPE_CHECKING:  # pragma: no cover
    from anomaly.config import PipelineConfig, load_config
    from anomaly.estimator.detectors.flow import FlowDetector
    from anomaly.estimator.detectors.gan import GANDetector
    from anomaly.estimator.detectors.vae import VAEDetector
    from anomaly.estimator.model import AnomalyModel
    from anomaly.features.preprocess import Preprocessor


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anomaly' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
