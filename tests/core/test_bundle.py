"""Bundles round-trip exactly; anything tampered, truncated, extra or traversing is refused."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from anomaly import AnomalyModel
from anomaly.bundle import MANIFEST, inspect_bundle
from anomaly.errors import BundleError


@pytest.fixture
def bundle(saved_bundle, tmp_path) -> Path:
    """A private copy of the shared bundle that a test may damage."""
    return Path(shutil.copytree(saved_bundle, tmp_path / "copy"))


def rewrite(bundle: Path, name: str, data: bytes, *, fix_manifest: bool) -> None:
    """Replace a file; with ``fix_manifest`` the attacker also updates its hash and size."""
    (bundle / name).write_bytes(data)
    if fix_manifest:
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_save_load_gives_identical_scores(fitted_model, saved_bundle, frame_problem):
    _, normal, anomalous = frame_problem
    loaded = AnomalyModel.load(saved_bundle)
    for rows in (normal, anomalous):
        np.testing.assert_array_equal(
            loaded.score_detectors(rows).to_numpy(), fitted_model.score_detectors(rows).to_numpy()
        )
    assert loaded.version == fitted_model.version and len(loaded.version) == 12
    assert loaded.explain(anomalous.head(3)) == fitted_model.explain(anomalous.head(3))
    manifest = json.loads((saved_bundle / MANIFEST).read_text())
    assert set(manifest["files"]) == {
        "vae.safetensors",
        "flow.safetensors",
        "gan.safetensors",
        "knn.safetensors",
        "calibration.safetensors",
    }
    assert manifest["libraries"]["torch"] == torch.__version__
    assert len(manifest["training_data"]["fingerprint"]) == 64
    assert manifest["metrics"]["threshold"] == pytest.approx(fitted_model.threshold_)
    assert set(manifest["metrics"]["calibration_quantiles"]) == {"p50", "p90", "p99", "p999"}
    assert inspect_bundle(saved_bundle)["version"] == loaded.version


def test_no_pickle_in_the_bundle_code():
    import anomaly

    root = Path(anomaly.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, path


def test_weights_changed_without_updating_manifest_is_refused(bundle):
    data = bytearray((bundle / "vae.safetensors").read_bytes())
    data[-5] ^= 0xFF
    rewrite(bundle, "vae.safetensors", bytes(data), fix_manifest=False)
    with pytest.raises(BundleError, match=r"sha256 of 'vae\.safetensors' does not match"):
        AnomalyModel.load(bundle)


def test_truncated_file_is_refused(bundle):
    data = (bundle / "flow.safetensors").read_bytes()
    (bundle / "flow.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or modified"):
        AnomalyModel.load(bundle)
    # Even if the attacker also fixes the manifest, safetensors cannot parse it.
    rewrite(bundle, "flow.safetensors", data[: len(data) // 2], fix_manifest=True)
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        AnomalyModel.load(bundle)


class _Boom:
    def __reduce__(self):
        return (Path("/tmp/anomaly-pwned-by-bundle").touch, ())


def test_pickle_payload_is_never_executed(bundle):
    marker = Path("/tmp/anomaly-pwned-by-bundle")
    marker.unlink(missing_ok=True)
    payload = pickle.dumps(_Boom())
    # As an extra file next to the weights:
    (bundle / "model.pkl").write_bytes(payload)
    with pytest.raises(BundleError, match=r"unexpected file\(s\).*model.pkl"):
        AnomalyModel.load(bundle)
    (bundle / "model.pkl").unlink()
    # In place of the weights, with the manifest hash updated to match:
    rewrite(bundle, "gan.safetensors", payload, fix_manifest=True)
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        AnomalyModel.load(bundle)
    assert not marker.exists()


def test_wrong_shapes_are_refused(bundle):
    tensors = st_load((bundle / "vae.safetensors").read_bytes())
    key = "log_scale"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1)
    rewrite(bundle, "vae.safetensors", st_save(tensors), fix_manifest=True)
    with pytest.raises(BundleError, match="log_scale"):
        AnomalyModel.load(bundle)


def test_shapes_consistent_with_manifest_but_not_architecture_are_refused(bundle):
    tensors = st_load((bundle / "gan.safetensors").read_bytes())
    key = "disc_head.weight"
    tensors[key] = torch.zeros(1, tensors[key].shape[1] + 2)
    rewrite(bundle, "gan.safetensors", st_save(tensors), fix_manifest=True)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["detector_params"]["gan"]["tensors"][key]["shape"] = list(tensors[key].shape)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"disc_head\.weight"):
        AnomalyModel.load(bundle)


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors", ".hidden"]
)
def test_path_traversal_names_are_refused(bundle, name):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="is not allowed"):
        AnomalyModel.load(bundle)


def test_symlink_missing_file_and_garbage_manifest_are_refused(bundle, tmp_path):
    (bundle / "link").symlink_to(tmp_path)
    with pytest.raises(BundleError, match="not a regular file"):
        AnomalyModel.load(bundle)
    (bundle / "link").unlink()
    (bundle / "calibration.safetensors").unlink()
    with pytest.raises(
        BundleError, match=r"'calibration\.safetensors' listed in the manifest is missing"
    ):
        AnomalyModel.load(bundle)
    (bundle / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        AnomalyModel.load(bundle)
    with pytest.raises(BundleError, match="not a directory"):
        AnomalyModel.load(tmp_path / "nope")


def test_save_refuses_a_non_empty_directory(fitted_model, saved_bundle):
    with pytest.raises(BundleError, match="not empty"):
        fitted_model.save(saved_bundle)


def test_explicit_version_survives_save_and_load(saved_bundle, tmp_path):
    model = AnomalyModel.load(saved_bundle)
    model.version = "cards-2026-11-24"
    assert model.save(tmp_path / "named") == "cards-2026-11-24"
    again = AnomalyModel.load(tmp_path / "named")
    assert again.version == "cards-2026-11-24"
    assert inspect_bundle(tmp_path / "named")["version"] == "cards-2026-11-24"
