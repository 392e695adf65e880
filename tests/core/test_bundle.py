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
from anomaly.cli import main
from anomaly.errors import BundleError, IdentityError
from anomaly.estimator.bundle import CONTENT_KEY, MANIFEST, inspect_bundle, seal_manifest


@pytest.fixture
def bundle(saved_bundle, tmp_path) -> Path:
    """A private copy of the shared bundle that a test may damage."""
    return Path(shutil.copytree(saved_bundle, tmp_path / "copy"))


def write_manifest(bundle: Path, manifest: dict) -> None:
    """An attacker who edits the manifest and recomputes its content_sha256 too (it is a checksum,
    not a signature): what only the registered identity can catch, and what lets these tests
    reach the checks behind the self-check."""
    (bundle / MANIFEST).write_bytes(seal_manifest(manifest))


def rewrite(bundle: Path, name: str, data: bytes, *, fix_manifest: bool) -> None:
    """Replace a file; with ``fix_manifest`` the attacker also updates its hash and size."""
    (bundle / name).write_bytes(data)
    if fix_manifest:
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        write_manifest(bundle, manifest)


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
        "knn_linear.safetensors",
        "calibration.safetensors",
    }
    assert manifest["libraries"]["torch"] == torch.__version__
    assert len(manifest["training_data"]["fingerprint"]) == 64
    assert manifest["metrics"]["threshold"] == pytest.approx(fitted_model.threshold_)
    assert set(manifest["metrics"]["calibration_quantiles"]) == {"p50", "p90", "p99", "p999"}
    assert inspect_bundle(saved_bundle)["version"] == loaded.version


def test_a_missing_category_takes_the_most_frequent_one_after_save_and_load(
    fitted_model, saved_bundle, frame_problem
):
    """As a missing number takes the training median: normal rows without a merchant alert no
    more than with their most frequent one (in the unseen bucket they all alerted)."""
    _, normal, _ = frame_problem
    loaded = AnomalyModel.load(saved_bundle)
    assert fitted_model.preprocessor_.impute_category_ == {"merchant": "grocery"}
    assert loaded.preprocessor_.impute_category_ == {"merchant": "grocery"}
    missing = normal.assign(merchant=None)
    np.testing.assert_array_equal(
        loaded.decision_function(missing),
        fitted_model.decision_function(normal.assign(merchant="grocery")),
    )
    assert loaded.predict(missing).mean() < 0.05


def test_an_imputed_category_outside_the_vocabulary_is_refused(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["preprocessing"]["impute_categories"] = {"merchant": "casino"}
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="imputed category is not in its column's vocabulary"):
        AnomalyModel.load(bundle)


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
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=r"disc_head\.weight"):
        AnomalyModel.load(bundle)


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors", ".hidden"]
)
def test_path_traversal_names_are_refused(bundle, name):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    write_manifest(bundle, manifest)
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


# -- identity: the manifest is covered, the registered sha256 is compared -----------------------


def _threshold_edited_by_one_byte(bundle: Path) -> tuple[bytes, bytes]:
    """Change one digit of the ensemble threshold in manifest.json's bytes, nothing else."""
    raw = (bundle / MANIFEST).read_bytes()
    manifest = json.loads(raw)
    text = json.dumps(manifest["calibration"]["ensemble"]["threshold"]).encode()
    at = raw.index(b'"threshold": ' + text) + len(b'"threshold": ') + len(text) - 1
    edited = raw[:at] + (b"1" if raw[at : at + 1] != b"1" else b"2") + raw[at + 1 :]
    (bundle / MANIFEST).write_bytes(edited)
    return raw, edited


def test_manifest_edited_by_one_byte_is_refused(bundle):
    raw, edited = _threshold_edited_by_one_byte(bundle)
    before = json.loads(raw)["calibration"]["ensemble"]["threshold"]
    assert json.loads(edited)["calibration"]["ensemble"]["threshold"] != before
    with pytest.raises(IdentityError, match=r"^bundle .*manifest\.json was edited") as info:
        AnomalyModel.load(bundle)
    from anomaly.estimator.bundle import content_sha256

    recorded, computed = json.loads(raw)[CONTENT_KEY], content_sha256(json.loads(edited))
    assert str(info.value) == (
        f"bundle {bundle}: manifest.json was edited after it was saved: its content sha256 is "
        f"{computed}, it records {recorded}; refused"
    )


def test_anomaly_inspect_refuses_an_edited_manifest_in_one_line(bundle, capsys):
    _threshold_edited_by_one_byte(bundle)
    assert main(["inspect", "--model", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: bundle {bundle}: manifest.json was edited")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_registered_identity_is_compared_before_anything_else(bundle, saved_bundle):
    """A manifest edited *and* re-sealed passes its self-check (it is not a signature) and is a
    different bundle: its identity differs, so loading it as the registered one is refused."""
    registered = AnomalyModel.load(saved_bundle).bundle_sha256_
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["calibration"]["ensemble"]["threshold"] *= 1.5
    write_manifest(bundle, manifest)
    impostor = AnomalyModel.load(bundle)
    assert impostor.bundle_sha256_ != registered and impostor.version != registered[:12]
    with pytest.raises(IdentityError) as info:
        AnomalyModel.load(bundle, expected_sha256=registered, registered_as="model version 'v1'")
    assert str(info.value) == (
        f"bundle {bundle}: identity (manifest sha256) {impostor.bundle_sha256_} differs from the "
        f"registered {registered} (model version 'v1'); refused (another bundle, or an edited "
        "one, is in its place)"
    )
    # Compared before the files are read: a bundle with broken weights reports the identity.
    (bundle / "vae.safetensors").write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="differs from the registered"):
        AnomalyModel.load(bundle, expected_sha256=registered)
    assert AnomalyModel.load(saved_bundle, expected_sha256=registered).bundle_sha256_ == registered


def test_saved_bundle_records_a_content_sha256_over_the_whole_manifest(saved_bundle):
    from anomaly.estimator.bundle import content_sha256

    manifest = json.loads((saved_bundle / MANIFEST).read_bytes())
    assert manifest[CONTENT_KEY] == content_sha256(manifest)
    for key in ("calibration", "preprocessing", "ensemble_weights", "files", "version", "metrics"):
        changed = dict(manifest)
        changed[key] = "other"
        assert content_sha256(changed) != manifest[CONTENT_KEY], key
    info = inspect_bundle(saved_bundle)
    sha = hashlib.sha256((saved_bundle / MANIFEST).read_bytes()).hexdigest()
    assert info["identity"]["sha256"] == sha == info["manifest_sha256"]
    assert info["identity"][CONTENT_KEY] == manifest[CONTENT_KEY]
    assert info["identity"]["self_check"] == "ok"


def test_manifest_is_strict_json_even_for_nan_numbers(saved_bundle):
    """NaN and infinities are not JSON: a strict parser (any language but Python's default)
    would refuse the manifest. Missing numbers are written as null, NumPy's as well."""

    def refuse(constant):
        raise ValueError(f"{constant} in the manifest")

    json.loads((saved_bundle / MANIFEST).read_bytes(), parse_constant=refuse)
    sealed = seal_manifest({"loss": np.float64("nan"), "scores": [np.float32("inf"), 1.5]})
    parsed = json.loads(sealed, parse_constant=refuse)
    assert parsed["loss"] is None and parsed["scores"] == [None, 1.5]


def test_bundle_saved_before_content_sha256_still_loads(bundle, saved_bundle):
    """Older bundles have no self-check: they load, and only the registered identity (the sha256
    of their manifest.json, unchanged by this) can catch an edit of their manifest."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    del manifest[CONTENT_KEY]
    old_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (bundle / MANIFEST).write_bytes(old_bytes)
    old_sha = hashlib.sha256(old_bytes).hexdigest()
    model = AnomalyModel.load(bundle, expected_sha256=old_sha)
    assert model.bundle_sha256_ == old_sha and model.version == old_sha[:12]
    assert inspect_bundle(bundle)["identity"]["self_check"].startswith("absent")
    _threshold_edited_by_one_byte(bundle)
    assert AnomalyModel.load(bundle).bundle_sha256_ != old_sha  # undetectable on its own
    with pytest.raises(IdentityError, match="differs from the registered"):
        AnomalyModel.load(bundle, expected_sha256=old_sha)


def _bytes_read() -> int:
    """Bytes this process has read through read(2) so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_a_file_larger_than_the_manifest_says_is_refused_without_reading_it(bundle):
    grown = 256 * 1024 * 1024
    path = bundle / "vae.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size + grown)  # sparse: costs no disk
    before = _bytes_read()
    with pytest.raises(BundleError, match=rf"'vae\.safetensors' has {size + grown} bytes"):
        AnomalyModel.load(bundle)
    read = _bytes_read() - before
    assert read < grown // 16, f"{read} bytes read to refuse a file {grown} bytes too large"
