"""Model bundles: a directory of safetensors files and one JSON manifest. No pickle anywhere.

Layout::

    MODEL_DIR/
      manifest.json            schema, preprocessing parameters, detector hyper-parameters and
                               tensor shapes, calibration summaries and thresholds, library
                               versions, training-data fingerprint, sha256 and size of every file
      vae.safetensors          one file per detector (weights and buffers)
      flow.safetensors
      gan.safetensors
      calibration.safetensors  the sorted calibration scores of each detector and the ensemble

Loading refuses (``BundleError``) anything that does not match: a missing, extra or non-regular file
(symlinks, folders), a file name that is not a plain name (path traversal), a size or sha256 that
differs from the manifest, a file safetensors cannot parse (truncated, or a pickle), a tensor whose
name, shape or dtype differs from what the manifest and the detector's architecture say. Bytes are
hashed and parsed from the same read, and nothing loaded can run code: safetensors holds only raw
tensors and JSON holds only data.

Identity. A bundle's identity is the sha256 of its manifest.json bytes (``model.bundle_sha256_``,
what ``anomaly models register`` records in ``model_versions.bundle_sha256``). It covers every byte
that affects a score: the manifest holds the preprocessing, thresholds, calibration summaries,
ensemble weights and detector parameters itself, and pins every other file by sha256 and size.
The model version is the first 12 hex digits of it (unless set in the manifest). Why this and not a
new digest over the content: the registered sha256 of every bundle saved so far stays valid, so no
row of ``model_versions`` needs rewriting, and any edit of manifest.json, even one that only
reformats it, changes the identity.

Two checks use it, for two threats:

* Against the registry (``expected_sha256``): ``serve`` passes the sha256 registered for the active
  version, and a bundle whose manifest differs is refused before anything else is read. This is
  the check that stops a deliberate swap or edit: the expected value lives in the database, outside
  the bundle directory, so whoever can write the directory cannot update it too.
* Self-check (``content_sha256`` in the manifest): the sha256 of the manifest's canonical JSON
  (sorted keys, no whitespace) without that key. A manifest edited by hand or damaged (a threshold
  changed by one byte) no longer matches and is refused even where no registry is involved
  (``serve.model_dir``, ``anomaly score``, ``anomaly inspect``), instead of loading as a silently
  "new" version. It is a checksum, not a signature: someone who edits the manifest on purpose can
  recompute it, which is why ``serve`` also compares the registered identity. It is computed over
  the parsed JSON, so the same manifest pretty-printed differently passes (its identity changes).
  Bundles saved before it existed have no ``content_sha256``: they still load, but only the
  registered identity can detect an edit of their manifest (re-save them to add it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from anomaly.errors import BundleError, DataError, IdentityError
from anomaly.estimator.explain import json_safe

# The model class (``AnomalyModel``) ``load_bundle`` builds: passed in by ``AnomalyModel.load``, so
# this module, which the model imports, never imports the model.
Model = TypeVar("Model")

FORMAT = "anomaly-monitor-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONTENT_KEY = "content_sha256"  # the manifest's self-check (see the module docstring)
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_sha256(manifest: dict[str, Any]) -> str:
    """The manifest's self-check: sha256 of its canonical JSON without ``content_sha256``.

    Canonical = sorted keys, no whitespace, over the parsed values: Python writes each parsed
    float back as the same shortest text, so a saved manifest gives the same digest when loaded.
    """
    body = {k: v for k, v in manifest.items() if k != CONTENT_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _sha256(text.encode())


def seal_manifest(manifest: dict[str, Any]) -> bytes:
    """manifest.json bytes with ``content_sha256`` set (what ``save_bundle`` writes)."""
    # Through JSON and back first: the digest must be of what a loader will parse.
    parsed = json.loads(json.dumps(json_safe(manifest)))
    parsed[CONTENT_KEY] = content_sha256(parsed)
    return json.dumps(parsed, indent=2, sort_keys=True).encode()


def _library_versions() -> dict[str, str]:
    import safetensors
    import zuko

    from anomaly.version import __version__

    return {
        "anomaly-monitor": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zuko": getattr(zuko, "__version__", "unknown"),
        "numpy": np.__version__,
        "safetensors": getattr(safetensors, "__version__", "unknown"),
    }


def check_bundle_directory(path: str | os.PathLike[str]) -> None:
    """Refuse a bundle path that is a file or a directory with something in it: ``save_bundle``
    never overwrites. Commands call it before training too, not to find out after it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise BundleError(f"bundle directory {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise BundleError(f"bundle directory {out} exists and is not empty")


def save_bundle(model: Any, path: str | os.PathLike[str]) -> str:
    """Write ``model`` (a fitted ``AnomalyModel``) to the directory ``path`` (created; must be
    empty if it exists)."""
    model._check_fitted()
    out = Path(path)
    check_bundle_directory(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    detectors: dict[str, Any] = {}
    for name, det in model.detectors_.items():
        tensors = det.state_tensors()
        files[f"{name}.safetensors"] = st_save(tensors)
        detectors[name] = {
            "class": type(det).__name__,
            "params": {**det.get_params(), "device": "cpu", "progress": False},
            "n_features": det.n_features_in_,
            "architecture": det.architecture(),
            "extra": det.extra_state(),
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in tensors.items()
            },
            "training": model.training_["detectors"].get(name, {}),
        }
    cal_tensors = {
        name: torch.from_numpy(np.ascontiguousarray(cal.scores_, dtype=np.float64))
        for name, cal in model.calibrators_.items()
    }
    files["calibration.safetensors"] = st_save(cal_tensors)
    # NumPy scalars, NaN and infinities in the entries are made JSON-safe once, by seal_manifest.
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "libraries": _library_versions(),
        "target_fpr": model.target_fpr,
        "seed": model.seed,
        "detectors": list(model.detectors_),
        "schema": model.schema_dict(),
        "preprocessing": model.preprocessor_.to_dict(),
        "detector_params": detectors,
        "calibration": {name: cal.to_dict() for name, cal in model.calibrators_.items()},
        "ensemble_weights": list(model.ensemble_weights_),
        "calibration_tensors": {name: len(cal.scores_) for name, cal in model.calibrators_.items()},
        "metrics": {k: v for k, v in model.metrics_.items() if k != "training"},
        "training_data": {k: v for k, v in model.training_.items() if k != "detectors"},
        "version": model._version,  # set explicitly by the user, else None
        "files": {
            fname: {"sha256": _sha256(data), "bytes": len(data)} for fname, data in files.items()
        },
    }
    for fname, data in files.items():
        (out / fname).write_bytes(data)
    manifest_bytes = seal_manifest(manifest)
    (out / MANIFEST).write_bytes(manifest_bytes)
    model._bundle_version = _sha256(manifest_bytes)[:12]
    model.bundle_path_ = str(out)
    model.bundle_sha256_ = _sha256(manifest_bytes)
    return str(model.version)


def _read_file(root: Path, fname: str, *, expected: int | None = None, limit: int = 0) -> bytes:
    """``root/fname``, its size checked before it is read: a multi-gigabyte file swapped into a
    bundle is refused by its size, never read whole into memory. One byte more than allowed is
    read, so a file that grew after the check is caught too. Something put in its place after
    the directory was listed is refused: ``O_NOFOLLOW`` a symlink, ``O_NONBLOCK`` (no effect on
    regular files) keeps a FIFO from blocking the open, and fstat then sees it is no file."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(root / fname, flags)
    except OSError as exc:
        raise BundleError(f"bundle {root}: cannot open '{fname}' ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"bundle {root}: '{fname}' is not a regular file; refused")
        _check_size(root, fname, st.st_size, expected, limit)
        raw = f.read((limit if expected is None else expected) + 1)
    _check_size(root, fname, len(raw), expected, limit)
    return raw


def _check_size(root: Path, fname: str, size: int, expected: int | None, limit: int) -> None:
    if expected is not None and size != expected:
        raise BundleError(
            f"bundle {root}: '{fname}' has {size} bytes, the manifest says {expected} "
            "(truncated or modified)"
        )
    if expected is None and size > limit:
        raise BundleError(f"bundle {root}: {fname} is implausibly large ({size} bytes)")


def _read_verified(
    root: Path, expected_sha256: str | None = None, registered_as: str | None = None
) -> tuple[dict[str, Any], dict[str, bytes], str]:
    if not root.is_dir():
        raise BundleError(f"model bundle {root} is not a directory")
    entries = {}
    for entry in os.scandir(root):
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise BundleError(f"bundle {root}: '{entry.name}' is not a regular file; refused")
        entries[entry.name] = entry
    if MANIFEST not in entries:
        raise BundleError(f"bundle {root}: {MANIFEST} is missing")
    manifest_bytes = _read_file(root, MANIFEST, limit=MAX_MANIFEST_BYTES)
    sha = _sha256(manifest_bytes)
    # First of all: the registered identity lives outside the bundle, so whoever swapped or
    # edited the directory could not update it too.
    if expected_sha256 is not None and sha != expected_sha256:
        raise IdentityError(
            f"bundle {root}: identity (manifest sha256) {sha} differs from the registered "
            f"{expected_sha256}{f' ({registered_as})' if registered_as else ''}; refused "
            "(another bundle, or an edited one, is in its place)"
        )
    try:
        manifest = json.loads(manifest_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {root}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"bundle {root}: {MANIFEST} is not an anomaly-monitor bundle manifest")
    # A manifest saved before the self-check existed records none: only a registered identity
    # protects it.
    recorded = manifest.get(CONTENT_KEY)
    if recorded is not None and recorded != content_sha256(manifest):
        raise IdentityError(
            f"bundle {root}: {MANIFEST} was edited after it was saved: its content sha256 is "
            f"{content_sha256(manifest)}, it records {recorded}; refused"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle {root}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise BundleError(f"bundle {root}: manifest lists no files")
    for fname in listed:  # (JSON's keys are always text)
        if not _SAFE_NAME.match(fname) or ".." in fname or fname == MANIFEST:
            raise BundleError(f"bundle {root}: file name {fname!r} in the manifest is not allowed")
    extra = sorted(set(entries) - set(listed) - {MANIFEST})
    if extra:
        raise BundleError(
            f"bundle {root}: unexpected file(s) not in the manifest: {', '.join(extra)}; refused"
        )
    data: dict[str, bytes] = {}
    for fname, meta in listed.items():
        if fname not in entries:
            raise BundleError(f"bundle {root}: file '{fname}' listed in the manifest is missing")
        size = meta.get("bytes") if isinstance(meta, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"bundle {root}: manifest entry for '{fname}' is malformed")
        raw = _read_file(root, fname, expected=size)
        if _sha256(raw) != meta.get("sha256"):
            raise BundleError(f"bundle {root}: sha256 of '{fname}' does not match the manifest")
        data[fname] = raw
    return manifest, data, sha


def _tensors(root: Path, fname: str, data: dict[str, bytes]) -> dict[str, torch.Tensor]:
    if fname not in data:
        raise BundleError(f"bundle {root}: '{fname}' is missing from the manifest")
    try:
        return st_load(data[fname])
    except Exception as exc:  # safetensors raises its own error types for any malformed file
        raise BundleError(
            f"bundle {root}: '{fname}' is not a valid safetensors file ({exc})"
        ) from None


def load_bundle(
    path: str | os.PathLike[str],
    model_cls: type[Model],
    device: str = "cpu",
    *,
    expected_sha256: str | None = None,
    registered_as: str | None = None,
) -> Model:
    """Load and verify a bundle into a new ``model_cls`` (``AnomalyModel``). With
    ``expected_sha256`` (the registered identity) a bundle whose manifest.json has another sha256
    is refused before anything else is read; ``registered_as`` (e.g. "model version 'v3' of
    pipeline 'cards'") goes into that error."""
    from anomaly.config import SchemaConfig
    from anomaly.estimator.detectors._base import resolve_device
    from anomaly.estimator.detectors.registry import ALL_DETECTORS
    from anomaly.features.preprocess import Preprocessor

    root = Path(path)
    manifest, data, version = _read_verified(root, expected_sha256, registered_as)
    try:
        schema = SchemaConfig(**manifest["schema"]) if manifest["schema"] else None
        names = [str(d) for d in manifest["detectors"]]
        if not names or set(names) - set(ALL_DETECTORS):
            raise BundleError(f"bundle {root}: unknown detectors {names}")
        model: Any = model_cls(
            target_fpr=float(manifest["target_fpr"]),
            seed=int(manifest["seed"]),
            device=device,
            detectors=tuple(names),
            schema=schema,
            numeric_transform=manifest["preprocessing"]["numeric_transform"],
        )
        model.preprocessor_ = Preprocessor.from_dict(manifest["preprocessing"], schema)
        n_out = model.preprocessor_.n_features_out_
        model.detectors_ = {}
        for name in model.detectors:
            spec = manifest["detector_params"][name]
            model.detectors_[name] = _load_detector(root, name, spec, n_out, data)
        if any(det.view == "linear" for det in model.detectors_.values()):
            try:
                model.preprocessor_.linear_plan()
            except DataError as exc:
                raise BundleError(f"bundle {root}: {exc}") from None
        model.calibrators_ = _load_calibrators(
            root, [*model.detectors, "ensemble"], model.target_fpr, data
        )
        # Bundles written before the weights were saved combined their members with equal ones.
        weights = manifest.get("ensemble_weights", [1.0 / len(names)] * len(names))
        if len(weights) != len(names) or not all(float(w) > 0 for w in weights):
            raise BundleError(f"bundle {root}: ensemble_weights {weights} do not fit {names}")
        model.ensemble_weights_ = [float(w) for w in weights]
        model.n_features_in_ = len(model.preprocessor_.feature_names_in_)
        model.feature_names_in_ = list(model.preprocessor_.feature_names_in_)
        model.training_ = dict(manifest.get("training_data", {}))
        model.training_["detectors"] = {
            name: manifest["detector_params"][name].get("training", {}) for name in model.detectors
        }
        model.manifest_ = manifest
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(
            f"bundle {root}: manifest is malformed ({type(exc).__name__}: {exc})"
        ) from None
    model.device_ = resolve_device(device)
    model.to(model.device_)
    if manifest.get("version") is not None:
        model.version = str(manifest["version"])
    model._bundle_version = version[:12]
    model.bundle_path_ = str(root)
    model.bundle_sha256_ = version  # sha256 of manifest.json, which pins every other file
    return model


def _load_detector(
    root: Path, name: str, spec: dict[str, Any], n_out: int, data: dict[str, bytes]
) -> Any:
    """Detector ``name`` from its manifest entry and safetensors file, shapes checked."""
    from anomaly.estimator.detectors.registry import detector_class

    cls = detector_class(name)
    if spec["class"] != cls.__name__:
        raise BundleError(f"bundle {root}: detector '{name}' has class {spec['class']!r}")
    if int(spec["n_features"]) != n_out:
        raise BundleError(
            f"bundle {root}: detector '{name}' expects {spec['n_features']} features, "
            f"the preprocessing produces {n_out}"
        )
    tensors = _tensors(root, f"{name}.safetensors", data)
    for key, meta in spec["tensors"].items():
        got = tensors.get(key)
        if got is None or list(got.shape) != list(meta["shape"]):
            raise BundleError(
                f"bundle {root}: tensor '{key}' of '{name}' has shape "
                f"{None if got is None else list(got.shape)}, manifest says {meta['shape']}"
            )
    params = dict(spec["params"])  # (the detectors take JSON's list for a tuple of widths)
    try:
        return cls.from_state(params, n_out, tensors, spec.get("extra"))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise BundleError(f"bundle {root}: detector '{name}': {exc}") from None


def _load_calibrators(
    root: Path, names: list[str], target_fpr: float, data: dict[str, bytes]
) -> dict[str, Any]:
    """A ``Calibrator`` per detector and the ensemble, from the sorted calibration scores."""
    from anomaly.estimator.calibration import Calibrator

    cal_tensors = _tensors(root, "calibration.safetensors", data)
    calibrators = {}
    for name in names:
        scores = cal_tensors.get(name)
        if scores is None or scores.ndim != 1 or len(scores) == 0:
            raise BundleError(f"bundle {root}: calibration scores for '{name}' are missing")
        arr = scores.double().numpy()
        if not np.isfinite(arr).all() or np.any(np.diff(arr) < 0):
            raise BundleError(f"bundle {root}: calibration scores for '{name}' are invalid")
        calibrators[name] = Calibrator.from_scores(target_fpr, arr)
    return calibrators


def inspect_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verified manifest summary for ``anomaly inspect`` (hashes checked, nothing executed)."""
    manifest, _, manifest_sha = _read_verified(Path(path))
    info = dict(manifest)
    info["version"] = manifest.get("version") or manifest_sha[:12]
    info["manifest_sha256"] = manifest_sha
    info["identity"] = {
        # What `anomaly models register` records and `serve` compares before loading.
        "sha256": manifest_sha,
        # The manifest's self-check, verified above; None for bundles saved before it existed.
        CONTENT_KEY: manifest.get(CONTENT_KEY),
        "self_check": "ok"
        if manifest.get(CONTENT_KEY) is not None
        else "absent (saved before content_sha256 existed: an edited manifest is detected only "
        "against the registered sha256; re-save the bundle to add it)",
    }
    return info
