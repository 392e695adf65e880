"""The detectors by name: which class each name in a config or a bundle manifest stands for.

The classes are imported on first use, so naming a detector does not import the others' code.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from anomaly.config import DETECTOR_NAMES
from anomaly.errors import ConfigError, one_line

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


def check_detector_params(detector_params: dict[str, dict[str, Any]] | None) -> None:
    """Raise ConfigError naming ``model.detector_params.<detector>`` for a parameter the detector
    does not have or a value its constructor refuses, before any data is read (``fit`` builds
    the detectors only after preprocessing)."""
    for name, params in (detector_params or {}).items():
        where = f"model.detector_params.{name}"
        if name not in ALL_DETECTORS:
            raise ConfigError(
                f"model.detector_params: unknown detector(s) {name} "
                f"(known: {', '.join(ALL_DETECTORS)})"
            )
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}: expected a mapping of parameters")
        known = list(detector_class(name)().get_params())
        unknown = sorted(map(str, set(params) - set(known)))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{where}: unknown parameter(s) {', '.join(unknown)}{hint}")
        try:
            detector_class(name)(**params)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {one_line(exc)}") from exc
