"""bench/quality.py on tiny generated datasets: the protocol run, the tables, the docs section."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # spawn workers and dataclasses look modules up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, shift in (("easy", 6.0), ("hard", 1.0)):
        normal = rng.normal(size=(300, 4))
        anomalies = rng.normal(size=(20, 4)) + shift
        x = np.vstack([normal, anomalies, normal[:5]]).astype(np.float32)  # 5 exact duplicates
        y = np.r_[np.zeros(300), np.ones(20), np.zeros(5)].astype(np.int8)
        np.savez(tmp_path / f"{name}.npz", X=x, y=y)
    return tmp_path


def _report(bench, capsys, data_dir: Path, *argv: str) -> str:
    """What ``bench/quality.py --data-dir DATA_DIR ARGV`` prints (it must exit 0)."""
    assert bench.main(["--data-dir", str(data_dir), *argv]) == 0
    return capsys.readouterr().out


def test_baselines_run_on_the_protocol_and_render(bench, data_dir: Path, capsys) -> None:
    out = _report(
        bench, capsys, data_dir, "--datasets", "easy,hard", "--seeds", "2",
        "--methods", "IForest,KNN", "--max-train", "100",
    )  # fmt: skip
    assert out.startswith("## Detection quality")
    assert "at most 100 training rows" in out
    roc = out.split("### ROC-AUC")[1].split("### PR-AUC")[0]
    rows = {
        cells[0]: [float(c.strip(" *")) for c in cells[2:4]]
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in roc.splitlines()
            if line.startswith("| easy") or line.startswith("| hard")
        )
    }
    # AUROC x100: the separated dataset scores near 100, the overlapping one clearly lower.
    easy, hard = rows["easy"], rows["hard"]
    assert min(easy) > 99.0
    assert max(hard) < min(easy)
    assert "**mean** (2 datasets)" in out
    assert "mean rank" in out


def test_all_runs_every_data_file_and_a_missing_one_is_named(bench, data_dir: Path, capsys):
    # Another suite (the held-out one) is a folder of NAME.npz files: "all" takes each of them.
    assert bench.dataset_files(data_dir, ["all"]) == ["easy", "hard"]
    out = _report(
        bench, capsys, data_dir, "--datasets", "all", "--seeds", "1",
        "--methods", "KNN,ensemble", "--max-train", "100",
    )  # fmt: skip
    assert "| easy" in out and "| hard" in out and "**mean** (2 datasets)" in out
    # The ensemble without its members in --methods: its goals, no best-member line.
    assert "- Ensemble mean ROC-AUC" in out and "its best member:" not in out
    with pytest.raises(SystemExit, match=r"no data file for medium in "):
        bench.main(["--data-dir", str(data_dir), "--datasets", "easy,medium"])
    with pytest.raises(SystemExit, match=r"no \.npz files in "):
        bench.dataset_files(data_dir / "nothing", ["all"])


def test_run_one_split_sizes(bench, data_dir: Path) -> None:
    args = bench.parse_args(["--methods", "IForest", "--max-train", "0"])
    r = bench.run_one(str(data_dir), "easy", 0, args)
    assert r["duplicates_dropped"] == 5
    assert r["n_train"] == 150
    assert r["n_test_normals"] == 150 and r["n_test_anomalies"] == 20
    assert 0.0 <= r["methods"]["IForest"]["auroc"] <= 1.0


def test_saved_members_recombine_to_the_ensemble(bench, data_dir: Path) -> None:
    from anomaly.estimator.ensemble import combine

    saved = data_dir / "members"
    args = bench.parse_args(["--methods", "ensemble", "--save-members", str(saved)])
    r = bench.run_one(str(data_dir), "easy", 2, args)
    with np.load(saved / "easy-seed2.npz") as z:
        members = list(z["members"])
        assert members == ["knn", "knn_linear"]  # 150 training rows: the knn members alone
        assert len(z["y_test"]) == r["n_test"] and z["y_test"].sum() == r["n_test_anomalies"]
        tails = [z[f"tail_{d}"] for d in members]
        np.testing.assert_allclose(combine(tails, z["weights"]), z["ensemble"], rtol=1e-12)
        assert all(len(z[f"raw_{d}"]) == r["n_test"] for d in members)


def _result(ds: str, seed: int, auroc: dict[str, float], fp: int, n: int) -> dict:
    return {
        "dataset": ds,
        "seed": seed,
        "n_train": 100,
        "n_test": n + 10,
        "n_test_anomalies": 10,
        "n_test_normals": n,
        "calibration_rows": 250,
        "methods": {
            m: {"auroc": v, "auprc": v / 2, "fit_s": 1.0, "score_s": 0.1} for m, v in auroc.items()
        },
        "fpr": {
            d: {"0.01": [fp, n], "0.001": [0, n]} for d in ("vae", "flow", "gan", "knn", "ensemble")
        },
    }


def test_goals_ranks_and_fpr_table(bench) -> None:
    base = {"IForest": 0.80, "KNN": 0.90, "OCSVM": 0.70, "PyOD-VAE": 0.75}
    ours = {"vae": 0.85, "flow": 0.78, "gan": 0.95, "knn": 0.91, "ensemble": 0.92}
    results = [
        _result("a", 0, {**base, **ours}, fp=20, n=2000),  # 1.0x target at 0.01
        _result("b", 0, {**base, **ours}, fp=80, n=2000),  # 4.0x: outside
        _result("skab_free", 0, {**base, **ours, "KNN": 0.1}, fp=5, n=2000),
    ]
    # 250 calibration rows cannot reach 0.001 (smallest p-value 1/251): "unreachable", not a miss.
    results[1]["fpr"]["ensemble"]["0.001"] = [0, 20000]
    results[0]["fpr_large"] = {"ensemble": {"0.01": [100, 20000], "0.001": [30, 20000]}}
    results[0]["n_train_large"] = 40000
    results[0]["calibration_rows_large"] = 10000
    args = bench.parse_args(["--fpr-max-train", "40000"])
    summary = bench.summarise(results, list(bench.METHODS))
    assert summary["protocol_datasets"] == ["a", "b"]  # the shifted variant is not averaged
    assert summary["means"]["KNN"]["auroc"] == pytest.approx(0.90)
    assert summary["mean_rank"]["gan"] == 1.0 and summary["mean_rank"]["ensemble"] == 2.0
    text = bench.render(summary, args, "python bench/quality.py", 60.0)
    assert "Ensemble mean ROC-AUC 92.0 vs the best baseline (KNN) 90.0 + 2.0: **met**" in text
    assert "Ensemble mean PR-AUC 46.0 vs KNN 45.0: **met**" in text
    assert "Best mean rank: gan (1.00; ensemble 2.00): **missed**" in text
    assert "Ensemble at least as good as its best member: 0 of 2 sets" in text
    assert "- flow mean ROC-AUC 78.0 vs IForest 80.0: **missed**" in text
    assert "- vae mean ROC-AUC 85.0 vs IForest 80.0: **met**" in text
    assert "1.00% (1.00x)" in text and "**4.00% (4.00x)**" in text
    assert "ensemble @0.01: 1/2" in text
    assert "- Ensemble false-positive rate within 0.5x-1.5x of 0.01: 1 of 2 datasets" in text
    assert "within 0.5x-1.5x of 0.001 with more calibration rows: 1 of 1 datasets" in text
    assert "| b | 250 | 2000 |" in text and "| unreachable |" in text
    # 2000 normal rows cannot tell a rate of 0.001 (2 expected false positives).
    assert "ensemble @0.001" not in text.split("Within 0.5x-1.5x")[1].split("\n")[0]
    large = text.split("#### The same rates with more calibration rows (up to 40000")[1]
    assert "| a | 10000 | 20000 |" in large
    assert "**0.50% (0.50x)**" not in large and "0.50% (0.50x)" in large  # 0.5x is within
    assert "**0.15% (1.50x)**" not in large and "0.15% (1.50x)" in large


def test_a_tie_for_the_best_mean_rank_is_named_and_not_met(bench) -> None:
    base = {"IForest": 0.80, "KNN": 0.90, "OCSVM": 0.70, "PyOD-VAE": 0.75}
    rest = {"vae": 0.85, "flow": 0.78, "gan": 0.80, "knn_linear": 0.70}
    # knn first on "a", the ensemble first on "b": 1.5 each.
    results = [
        _result("a", 0, {**base, **rest, "knn": 0.99, "ensemble": 0.95}, fp=20, n=2000),
        _result("b", 0, {**base, **rest, "knn": 0.95, "ensemble": 0.99}, fp=20, n=2000),
    ]
    summary = bench.summarise(results, list(bench.METHODS))
    text = bench.render(summary, bench.parse_args([]), "python bench/quality.py", 60.0)
    assert "Best mean rank: knn and ensemble (1.50; ensemble 1.50): **tied**, not met" in text


def test_write_section_replaces_only_its_own_section(bench, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\n## Scoring\n\nfast\n\n## Detection quality\n\nold\n\n## Kafka\n\nk\n"
    )
    bench.write_section(doc, "## Detection quality\n\nnew table\n")
    text = doc.read_text()
    assert "old" not in text and "new table" in text
    assert text.index("## Scoring") < text.index("new table") < text.index("## Kafka")
    assert "fast" in text and "\nk\n" in text
    fresh = tmp_path / "none.md"
    bench.write_section(fresh, "## Detection quality\n\nx\n")
    assert fresh.read_text().startswith("# Benchmarks") and "x" in fresh.read_text()


def test_ablations_get_their_own_table_and_no_rank(bench) -> None:
    base = {"IForest": 0.80, "KNN": 0.90, "OCSVM": 0.70, "PyOD-VAE": 0.75}
    ours = {"vae": 0.85, "flow": 0.78, "gan": 0.95, "knn": 0.91, "ensemble": 0.92}
    ablations = {name: 0.99 for name in bench.ABLATIONS} | {"gan-no-generator": 0.60}
    results = [_result(ds, 0, {**base, **ours, **ablations}, fp=20, n=2000) for ds in "ab"]
    args = bench.parse_args(["--ablate"])
    assert args.methods[-len(bench.ABLATIONS) :] == list(bench.ABLATIONS)
    summary = bench.summarise(results, args.methods)
    # 0.99 would top every dataset: ablations must not take part in the ranks.
    assert "gan-no-generator" not in summary["mean_rank"] and summary["mean_rank"]["gan"] == 1.0
    text = bench.render(summary, args, "python bench/quality.py --ablate", 60.0)
    main_table = text.split("### ROC-AUC x100")[1].split("###")[0]
    assert "gan-no-generator" not in main_table
    ablation_table = text.split("### Ablations")[1].split("###")[0]
    assert "| a | 85.0 | 78.0 | 95.0 | 91.0 | 92.0 | 60.0 |" in ablation_table


def test_paired_table_counts_sets_and_picks_members_on_other_seeds(bench) -> None:
    base = {"IForest": 0.80, "KNN": 0.90, "OCSVM": 0.70, "PyOD-VAE": 0.75}
    rest = {"flow": 0.70, "gan": 0.70, "knn_linear": 0.70}
    # Set "a": vae best on seed 0, knn on seed 1, so the member picked on the other seed is the
    # worse one each time; set "b": knn best on both seeds, and the ensemble above it.
    scores = {
        ("a", 0): {"vae": 0.95, "knn": 0.85, "ensemble": 0.90},
        ("a", 1): {"vae": 0.85, "knn": 0.95, "ensemble": 0.90},
        ("b", 0): {"vae": 0.80, "knn": 0.90, "ensemble": 0.93},
        ("b", 1): {"vae": 0.80, "knn": 0.90, "ensemble": 0.93},
    }
    results = [
        _result(ds, seed, {**base, **rest, **ours}, fp=20, n=2000)
        for (ds, seed), ours in scores.items()
    ]
    summary = bench.summarise(results, list(bench.METHODS))
    gaps = bench.paired(summary, ["KNN", "vae"])
    # Means over seeds: a: ensemble 0.90, vae 0.90, knn 0.90; b: 0.93 against 0.80 / 0.90.
    assert gaps["KNN"]["better"] == 1 and gaps["KNN"]["level"] == 1 and gaps["KNN"]["worse"] == 0
    assert gaps["KNN"]["mean"] == pytest.approx(0.015)
    assert gaps["vae"]["mean"] == pytest.approx((0.0 + 0.13) / 2)
    same = gaps["best member (same runs)"]
    assert (same["better"], same["level"], same["worse"]) == (1, 1, 0)
    # On "a" the member picked on the other seed scores 0.85 on this one: the ensemble leads by 5.
    picked = gaps["member picked on the other seeds"]
    assert picked["mean"] == pytest.approx((0.05 + 0.03) / 2)
    assert picked["low"] <= picked["mean"] <= picked["high"]
    text = bench.render(summary, bench.parse_args([]), "python bench/quality.py", 60.0)
    section = text.split("### The ensemble set by set against its rivals")[1].split("###")[0]
    assert "| KNN | 1 / 1 / 0 | +1.50 [+0.00, +3.00] | - |" in section
    assert "| member picked on the other seeds | 2 / 0 / 0 | +4.00 [" in section


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ensemble_without_generative_members_is_the_knn_only_models_score(bench) -> None:
    # The recombination must score rows as the model the user gets below min_generative_rows:
    # a fit of the knn members alone on the same rows and seed.
    from anomaly import AnomalyModel

    rng = np.random.default_rng(1)
    train = rng.normal(size=(240, 3)).astype(np.float32)
    test = np.vstack([rng.normal(size=(40, 3)), rng.normal(size=(10, 3)) + 3]).astype(np.float32)
    quick = {"vae": {"max_steps": 30, "min_steps": 0}}
    both = AnomalyModel(
        seed=3, progress=False, detectors=("vae", "knn", "knn_linear"), detector_params=quick
    ).fit(train)
    scores = both.score_detectors(test)
    variants = bench.recombinations(both, bench.member_tails(both, scores))
    assert set(variants) == {
        "ens-equal-weights", "ens-kind-weights", "ens-without-generative",
        *(f"ens-without-{d}" for d in bench.MEMBERS),
    }  # fmt: skip
    alone = AnomalyModel(seed=3, progress=False, detectors=("knn", "knn_linear")).fit(train)
    expected = alone.score_detectors(test)["ensemble"].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(variants["ens-without-generative"], expected, rtol=1e-9)
    # The vae is the only generative member here: leaving the kind out is leaving it out.
    np.testing.assert_array_equal(variants["ens-without-generative"], variants["ens-without-vae"])
    full = scores["ensemble"].to_numpy(dtype=np.float64)
    assert not np.allclose(variants["ens-without-generative"], full)
    # A member the model never fit leaves its ensemble as it is.
    np.testing.assert_allclose(variants["ens-without-flow"], full, rtol=1e-9)
