"""The example datasets: columns match the pipelines, labels are exact, structure is real."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anomaly.cli import main
from anomaly.config import load_config
from anomaly.synthetic.datasets import (
    FRAUD_KINDS,
    MANUFACTURING_KINDS,
    generate_fraud,
    generate_manufacturing,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("example", "fn", "kinds"),
    [
        ("fraud", generate_fraud, FRAUD_KINDS),
        ("manufacturing", generate_manufacturing, MANUFACTURING_KINDS),
    ],
)
def test_columns_labels_and_determinism(example, fn, kinds):
    cfg = load_config(ROOT / "examples" / f"{example}.yaml")
    frame = fn(4000, 0.05, seed=3)
    s = cfg.schema
    expected = [s.id_field, s.time_field, s.entity_field, *s.numeric, *s.categorical]
    assert list(frame.columns) == [*expected, "is_anomaly", "anomaly_kind"]
    assert len(frame) == 4000
    assert frame["id"].is_unique
    assert frame["event_time"].is_monotonic_increasing
    assert str(frame["event_time"].dt.tz) == "UTC"
    assert frame["is_anomaly"].sum() == 200
    assert ((frame["anomaly_kind"] != "") == (frame["is_anomaly"] == 1)).all()
    assert set(frame.loc[frame["is_anomaly"] == 1, "anomaly_kind"]) == set(kinds)
    assert not frame[s.numeric].isna().any().any()
    pd.testing.assert_frame_equal(frame, fn(4000, 0.05, seed=3))
    assert not frame[s.numeric].equals(fn(4000, 0.05, seed=4)[s.numeric])


def test_fraud_structure():
    frame = generate_fraud(20000, 0.02, seed=0)
    normal = frame[frame["is_anomaly"] == 0]
    # Heavy tail: the largest legitimate amounts are far above the median.
    assert normal["amount"].quantile(0.999) > 15 * normal["amount"].median()
    # velocity_1h counts the card's own earlier purchases in the last hour.
    t = frame["event_time"].astype("int64") / 1e9
    for _, g in frame.groupby("card_id").head(50).groupby("card_id"):
        times = t.loc[g.index].to_numpy()
        want = [
            int(((times[:i] > times[i] - 3600) & (times[:i] <= times[i])).sum())
            for i in range(len(times))
        ]
        assert g["velocity_1h"].tolist() == want
    # In normal traffic a card present purchase near home is in the home country, one far away
    # is abroad: per card, the near purchases share one country that no far purchase has.
    present = normal[normal["channel"] != "online"]
    assert not present["distance_from_home_km"].between(250.01, 399.99).any()
    for _, g in present.groupby("card_id"):
        near = set(g.loc[g["distance_from_home_km"] <= 250, "country"])
        far = set(g.loc[g["distance_from_home_km"] >= 400, "country"])
        assert len(near) <= 1 and not near & far
    # Per-card habits: cards differ in their typical amount far beyond sampling noise.
    med = normal.groupby("card_id")["amount"].median()
    assert med.quantile(0.9) > 2.5 * med.quantile(0.1)
    # Every anomaly kind departs from the normal data in the way it says.
    kinds = frame[frame["is_anomaly"] == 1].groupby("anomaly_kind")
    assert kinds.get_group("spike")["amount"].median() > normal["amount"].quantile(0.99)
    assert not set(kinds.get_group("rare_category")["merchant_category"]) & set(
        normal["merchant_category"]
    )
    assert kinds.get_group("burst")["velocity_1h"].min() >= 3
    assert kinds.get_group("spike")["amount_to_card_median"].median() > 10
    assert normal["amount_to_card_median"].median() == pytest.approx(1.0, abs=0.2)
    # The card's home country never changes and is where it shops unless it travels.
    assert (frame.groupby("card_id")["issuer_country"].nunique() == 1).all()
    near = present["distance_from_home_km"] <= 250
    assert (present.loc[near, "country"] == present.loc[near, "issuer_country"]).all()
    assert (present.loc[~near, "country"] != present.loc[~near, "issuer_country"]).all()
    broken = kinds.get_group("broken_correlation")
    at_home = broken["country"] == broken["issuer_country"]
    assert (broken.loc[at_home, "distance_from_home_km"] > 2000).all()
    assert (broken.loc[~at_home, "distance_from_home_km"] < 6).all()
    assert 0 < at_home.sum() < len(broken)


def test_manufacturing_structure():
    frame = generate_manufacturing(12000, 0.03, seed=1)
    normal = frame[frame["is_anomaly"] == 0]
    corr = normal[["current_a", "flow_lpm", "pressure_bar", "temperature_c"]].corr()
    assert corr.loc["current_a", "flow_lpm"] > 0.8
    assert corr.loc["flow_lpm", "pressure_bar"] > 0.8
    assert corr.loc["current_a", "temperature_c"] > 0.5
    # A shift pattern: daytime load is higher than at night.
    day = normal["event_time"].dt.hour.between(8, 20)
    assert normal.loc[day, "current_a"].mean() > normal.loc[~day, "current_a"].mean() + 5
    assert set(normal["mode"]) == {"idle", "run", "high_load"}
    # Drifts are contiguous runs of one machine's readings.
    drift = frame[frame["anomaly_kind"] == "drift"]
    assert len(drift) > 0
    for _, g in frame.groupby("machine_id"):
        flags = (g["anomaly_kind"] == "drift").to_numpy().astype(int)
        starts = int((np.diff(np.r_[0, flags]) == 1).sum())
        assert starts <= max(1, flags.sum() // 15 + 1)
    # A broken correlation keeps current in its normal range but flow/pressure off the line.
    broken = frame[frame["anomaly_kind"] == "broken_correlation"]
    assert broken["current_a"].between(normal["current_a"].min(), normal["current_a"].max()).all()
    fit = np.polyfit(normal["current_a"], normal["flow_lpm"], 1)
    resid = normal["flow_lpm"] - np.polyval(fit, normal["current_a"])
    broken_resid = broken["flow_lpm"] - np.polyval(fit, broken["current_a"])
    pressure_fit = np.polyfit(normal["flow_lpm"], normal["pressure_bar"], 1)
    p_resid = normal["pressure_bar"] - np.polyval(pressure_fit, normal["flow_lpm"])
    bp = broken["pressure_bar"] - np.polyval(pressure_fit, broken["flow_lpm"])
    off = (broken_resid.abs() > 3 * resid.std()) | (bp.abs() > 3 * p_resid.std())
    assert off.mean() > 0.8


def test_generate_command_writes_csv_and_parquet(tmp_path, capsys):
    out = tmp_path / "fraud.csv"
    rc = main(
        [
            "generate",
            "--example",
            "fraud",
            "--rows",
            "500",
            "--anomaly-fraction",
            "0.1",
            "--seed",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    back = pd.read_csv(out)
    assert len(back) == 500 and back["is_anomaly"].sum() == 50
    assert "wrote 500 fraud records" in capsys.readouterr().out
    pq = tmp_path / "m.parquet"
    assert main(["generate", "--example", "manufacturing", "--rows", "300", "--out", str(pq)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(pq), generate_manufacturing(300, 0.01, 0))
    assert (
        main(["generate", "--example", "fraud", "--rows", "50", "--out", str(tmp_path / "x.txt")])
        == 2
    )
    assert (
        main(
            [
                "generate",
                "--example",
                "fraud",
                "--rows",
                "50",
                "--anomaly-fraction",
                "0.7",
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_split_train_stream_keeps_one_fleet(tmp_path):
    from anomaly.synthetic.datasets import split_train_stream

    frame = generate_manufacturing(6000, 0.05, seed=5)
    train, stream = split_train_stream(frame, 4000)
    assert "is_anomaly" not in train.columns and "anomaly_kind" not in train.columns
    assert len(train) == 4000 - int(frame["is_anomaly"].iloc[:4000].sum())
    assert len(stream) == 2000 and stream["id"].iloc[0] == frame["id"].iloc[4000]
    assert train["event_time"].max() <= stream["event_time"].min()
    assert set(stream["machine_id"]) == set(train["machine_id"])
    with pytest.raises(ValueError, match="train_rows"):
        split_train_stream(frame, 6000)
    out, tr = tmp_path / "s.parquet", tmp_path / "t.parquet"
    argv = ["generate", "--example", "fraud", "--rows", "900", "--anomaly-fraction", "0.05"]
    assert main([*argv, "--train-rows", "600", "--train-out", str(tr), "--out", str(out)]) == 0
    assert len(pd.read_parquet(out)) == 300
    assert pd.read_parquet(tr)["card_id"].isin(pd.read_parquet(out)["card_id"]).mean() > 0.5
    assert main([*argv, "--train-rows", "600", "--out", str(out)]) == 2
