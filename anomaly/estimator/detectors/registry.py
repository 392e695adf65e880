"""The detectors by name: which class each name in a config or a bundle manifest stands for.

The classes are imported on first use, so naming a detector does not import the others' code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from anomaly.config import DETECTOR_NAMES

if TYPE_CHECKING:
    from anomaly.estimator.detectors._base import BaseDetector

DETECTOR_CLASSES = {
    "vae": ("anomaly.estimator.detectors.vae", "VAEDetector"),
    "flow": ("anomaly.estimator.detectors.flow", "FlowDetector"),
    "gan": ("anomaly.estimator.detectors.gan", "GANDetector"),
    "knn": ("anomaly.estimator.detectors.knn", "KNNDetector"),
    "knn_linear": ("anomaly.estimator.detectors.knn", "KNNLinearDetector"),
}
ALL_DETECTORS = DETECTOR_NAMES


def detector_class(name: str) -> type[BaseDetector]:
    module, cls = DETECTOR_CLASSES[name]
    return getattr(importlib.import_module(module), cls)
