"""Example data for the two example pipelines: card fraud and manufacturing sensors.

Pure numpy/pandas (no Kafka, no SQL). Each generator returns a DataFrame sorted by ``event_time``
with an ``id`` column, ``event_time`` (UTC), the entity, the features of the matching
``examples/*.yaml`` pipeline, ``is_anomaly`` (0/1) and ``anomaly_kind`` (empty for normal rows).

Normal data is meant to be realistic enough that a detector has to learn structure, not ranges:

* fraud: per-card habits (home country, favourite merchant categories and channels, typical
  amount, active hours), heavy-tailed (log-normal) amounts, a daily cycle, occasional travel with
  a matching distance from home; ``issuer_country`` (the card's home), ``velocity_1h`` and
  ``amount_to_card_median`` computed from each card's own timeline, as a fraud pipeline's
  feature step would.
* manufacturing: per-machine gains around a shared latent load with a shift pattern and a daily
  ambient cycle; current, flow, pressure, temperature and vibration are all driven by the load,
  so they move together, and the operating mode follows from it.

Anomalies are labeled by kind. Several are invisible to per-feature range checks on purpose:

* fraud: ``spike`` (an amount many times the card's usual), ``rare_category`` (a merchant
  category never seen in normal traffic), ``broken_correlation`` (home country but thousands of km
  from home, or abroad but next door), ``burst`` (card testing: a run of tiny online purchases
  minutes apart; the records from the fourth on carry the label).
* manufacturing: ``spike`` (vibration, pressure or current jump), ``drift`` (a segment in which
  temperature or vibration creeps away from its load-explained value), ``broken_correlation``
  (a blocked or leaking line: flow or pressure no longer matches the current drawn),
  ``rare_category`` (an operating mode never seen in normal traffic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from anomaly.synthetic.timelines import amount_to_card_median, velocity_1h

FRAUD_NUMERIC = [
    "amount",
    "amount_to_card_median",
    "hour",
    "distance_from_home_km",
    "velocity_1h",
]
FRAUD_CATEGORICAL = ["merchant_category", "country", "issuer_country", "channel"]
MANUFACTURING_NUMERIC = [
    "vibration_rms",
    "current_a",
    "pressure_bar",
    "temperature_c",
    "flow_lpm",
]
MANUFACTURING_CATEGORICAL = ["mode"]

FRAUD_KINDS = {"spike": 0.3, "broken_correlation": 0.25, "rare_category": 0.2, "burst": 0.25}
MANUFACTURING_KINDS = {
    "spike": 0.3,
    "drift": 0.3,
    "broken_correlation": 0.25,
    "rare_category": 0.15,
}

# Where the generated timelines start: fixed, so a seed gives the same file on every machine.
START = pd.Timestamp("2026-01-05T00:00:00Z")

_CATEGORIES = np.array(
    [
        "grocery",
        "restaurant",
        "fuel",
        "online_retail",
        "travel",
        "electronics",
        "pharmacy",
        "entertainment",
        "utilities",
        "digital_goods",
    ]
)
_CATEGORY_WEIGHTS = np.array([0.24, 0.17, 0.1, 0.14, 0.03, 0.04, 0.06, 0.07, 0.05, 0.1])
# Typical amount relative to the card's own scale.
_CATEGORY_SCALE = np.array([1.0, 0.8, 1.3, 1.6, 4.0, 3.0, 0.6, 1.1, 2.0, 0.3])
# Probability that a purchase in the category is online.
_CATEGORY_ONLINE = np.array([0.05, 0.08, 0.0, 0.95, 0.6, 0.4, 0.1, 0.3, 0.7, 1.0])
_UNSEEN_CATEGORIES = np.array(["gambling", "crypto_exchange", "money_transfer", "pawn_shop"])
_COUNTRIES = np.array(["US", "GB", "DE", "FR", "CA", "NL", "ES", "IT", "JP", "AU"])
_COUNTRY_WEIGHTS = np.array([0.4, 0.14, 0.12, 0.09, 0.07, 0.05, 0.05, 0.04, 0.02, 0.02])
_MODES_UNSEEN = np.array(["manual_override", "calibration"])


def _check(n: int, anomaly_fraction: float) -> None:
    if n < 10:
        raise ValueError(f"n must be at least 10, got {n}")
    if not 0.0 <= anomaly_fraction < 0.5:
        raise ValueError(f"anomaly_fraction must be in [0, 0.5), got {anomaly_fraction}")


def _quotas(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Split ``total`` anomalies over kinds by share, exactly (largest remainders)."""
    raw = {k: total * s for k, s in shares.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    rest = total - sum(counts.values())
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[:rest]:
        counts[k] += 1
    return counts


def _finish(frame: pd.DataFrame, id_prefix: str, columns: list[str]) -> pd.DataFrame:
    # Stable: records at the same time keep the order they were generated in.
    frame = frame.sort_values("event_time", kind="stable").reset_index(drop=True)
    width = max(7, len(str(len(frame))))
    frame.insert(0, "id", [f"{id_prefix}-{i:0{width}d}" for i in range(len(frame))])
    frame["is_anomaly"] = (frame["anomaly_kind"] != "").astype("int64")
    return frame[["id", "event_time", *columns, "is_anomaly", "anomaly_kind"]]


class _FreeRows:
    """The rows no anomaly has been put in yet; ``take(k)`` picks ``k`` of them at random."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.free = np.ones(n, dtype=bool)
        self.rng = rng

    def take(self, k: int) -> np.ndarray:
        free = self.free
        idx = self.rng.choice(np.flatnonzero(free), k, replace=False) if k else np.array([], int)
        free[idx] = False
        return idx


# --------------------------------------------------------------------------------------- fraud


def generate_fraud(n: int, anomaly_fraction: float = 0.01, seed: int = 0) -> pd.DataFrame:
    """Card transactions; entity ``card_id``. See the module docstring for the anomaly kinds."""
    _check(n, anomaly_fraction)
    rng = np.random.default_rng(seed)
    n_cards = int(np.clip(n // 40, 20, 5000))
    days = max(2, int(np.ceil(n / (n_cards * 4.0))))
    cards = _CardHabits.draw(rng, n_cards)
    frame = _transactions(rng, n, days, cards)
    quotas = _quotas(round(n * anomaly_fraction), FRAUD_KINDS)
    free = _FreeRows(n, rng)
    _card_testing_runs(frame, rng, free, quotas["burst"], days, cards)
    _single_fraud(frame, rng, free, quotas, cards)
    return _fraud_columns(frame, cards)


@dataclass
class _CardHabits:
    """Each card's habits (one value per card)."""

    home: np.ndarray  # index into _COUNTRIES
    amount_mu: np.ndarray  # log scale of the card's usual purchase
    amount_sigma: np.ndarray
    peak_hour: np.ndarray
    hour_sd: np.ndarray
    cat_pref: np.ndarray  # (cards, categories)
    contactless: np.ndarray  # share of in-store purchases paid contactless
    travel_rate: np.ndarray
    activity: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n_cards: int) -> _CardHabits:
        return cls(
            home=rng.choice(len(_COUNTRIES), n_cards, p=_COUNTRY_WEIGHTS),
            amount_mu=rng.normal(3.0, 0.5, n_cards),
            amount_sigma=rng.uniform(0.5, 0.9, n_cards),
            peak_hour=rng.normal(14.0, 3.0, n_cards),
            hour_sd=rng.uniform(2.0, 4.0, n_cards),
            cat_pref=rng.dirichlet(_CATEGORY_WEIGHTS * 12.0, n_cards),
            contactless=rng.uniform(0.2, 0.8, n_cards),
            travel_rate=rng.beta(1.0, 30.0, n_cards),
            activity=rng.gamma(4.0, 0.25, n_cards),
        )

    @property
    def n(self) -> int:
        return len(self.home)


def _transactions(rng: np.random.Generator, n: int, days: int, cards: _CardHabits) -> pd.DataFrame:
    """``n`` normal transactions of the cards over ``days`` days."""
    card = rng.choice(cards.n, n, p=cards.activity / cards.activity.sum())
    day = rng.integers(0, days, n)
    hour_f = np.mod(rng.normal(cards.peak_hour[card], cards.hour_sd[card]), 24.0)
    seconds = day * 86400.0 + hour_f * 3600.0
    cum = np.cumsum(cards.cat_pref, axis=1)
    cat = (rng.random(n)[:, None] > cum[card]).sum(axis=1).clip(0, len(_CATEGORIES) - 1)
    online = rng.random(n) < _CATEGORY_ONLINE[cat]
    atm = (~online) & (rng.random(n) < 0.06)
    channel = np.where(
        online,
        "online",
        np.where(
            atm, "atm", np.where(rng.random(n) < cards.contactless[card], "contactless", "pos")
        ),
    )
    amount = np.exp(rng.normal(cards.amount_mu[card], cards.amount_sigma[card]))
    amount = amount * _CATEGORY_SCALE[cat]
    amount = np.where(atm, rng.choice([20.0, 40.0, 50.0, 100.0, 200.0], n), amount)
    home = cards.home
    traveling = rng.random(n) < cards.travel_rate[card]
    abroad = rng.choice(len(_COUNTRIES), n, p=_COUNTRY_WEIGHTS)
    abroad = np.where(abroad == home[card], (abroad + 1) % len(_COUNTRIES), abroad)
    country_idx = np.where(traveling, abroad, home[card])
    distance = np.where(
        online,
        0.0,  # card-not-present: the distance of the billing address, which is home
        np.where(
            traveling,
            rng.uniform(400.0, 9000.0, n),
            np.minimum(rng.lognormal(np.log(6.0), 1.0, n), 250.0),
        ),
    )
    return pd.DataFrame(
        {
            "card": card,
            "seconds": seconds,
            "amount": amount,
            "merchant_category": _CATEGORIES[cat],
            "country": _COUNTRIES[country_idx],
            "channel": channel,
            "distance_from_home_km": distance,
            "anomaly_kind": np.full(n, "", dtype=object),
        }
    )


def _card_testing_runs(
    frame: pd.DataFrame,
    rng: np.random.Generator,
    free: _FreeRows,
    quota: int,
    days: int,
    cards: _CardHabits,
) -> None:
    """Card testing: runs of 11 to 23 tiny online purchases within ten minutes on one card. The
    first three of a run look like any small online purchase and stay normal; once the run is
    under way (velocity_1h >= 3) the records are labeled."""
    remaining = quota
    while remaining > 0:
        labeled = int(min(remaining, rng.integers(8, 21)))
        rows = free.take(labeled + 3)
        if len(rows) < labeled + 3:
            break
        c = rng.integers(cards.n)
        t0 = rng.integers(0, days) * 86400.0 + rng.uniform(0, 86400.0 - 3600.0)
        offsets = np.sort(rng.uniform(0, 10 * 60.0, len(rows)))
        frame.loc[rows, "card"] = c
        frame.loc[rows, "seconds"] = t0 + offsets
        frame.loc[rows, "amount"] = rng.uniform(0.5, 3.0, len(rows))
        frame.loc[rows, "merchant_category"] = "digital_goods"
        frame.loc[rows, "channel"] = "online"
        frame.loc[rows, "country"] = _COUNTRIES[cards.home[c]]
        frame.loc[rows, "distance_from_home_km"] = 0.0
        frame.loc[rows[3:], "anomaly_kind"] = "burst"
        remaining -= labeled


def _single_fraud(
    frame: pd.DataFrame,
    rng: np.random.Generator,
    free: _FreeRows,
    quotas: dict[str, int],
    cards: _CardHabits,
) -> None:
    """The anomalies of one record each: spikes, unseen categories, broken correlations."""
    rows = free.take(quotas["spike"])
    scale = np.exp(cards.amount_mu[frame.loc[rows, "card"].to_numpy()])
    frame.loc[rows, "amount"] = scale * rng.uniform(60.0, 200.0, len(rows))
    frame.loc[rows, "merchant_category"] = rng.choice(["electronics", "travel"], len(rows))
    frame.loc[rows, "anomaly_kind"] = "spike"

    rows = free.take(quotas["rare_category"])
    frame.loc[rows, "merchant_category"] = rng.choice(_UNSEEN_CATEGORIES, len(rows))
    frame.loc[rows, "anomaly_kind"] = "rare_category"

    rows = free.take(quotas["broken_correlation"])
    home = cards.home
    cards_of = frame.loc[rows, "card"].to_numpy()
    far_at_home = rng.random(len(rows)) < 0.5
    other = (home[cards_of] + rng.integers(1, len(_COUNTRIES), len(rows))) % len(_COUNTRIES)
    frame.loc[rows, "country"] = _COUNTRIES[np.where(far_at_home, home[cards_of], other)]
    frame.loc[rows, "channel"] = np.where(far_at_home, "pos", "contactless")
    frame.loc[rows, "distance_from_home_km"] = np.where(
        far_at_home, rng.uniform(2500.0, 9000.0, len(rows)), rng.uniform(0.5, 5.0, len(rows))
    )
    frame.loc[rows, "anomaly_kind"] = "broken_correlation"


def _fraud_columns(frame: pd.DataFrame, cards: _CardHabits) -> pd.DataFrame:
    """The published columns: event time, the derived features, the card id; sorted by time."""
    seconds = frame["seconds"].to_numpy()
    frame["event_time"] = START + pd.to_timedelta(np.round(seconds, 3), unit="s")
    frame["hour"] = frame["event_time"].dt.hour.astype("int64")
    frame["velocity_1h"] = velocity_1h(frame["card"].to_numpy(), seconds)
    frame = frame.round({"amount": 2, "distance_from_home_km": 2})
    frame["amount_to_card_median"] = amount_to_card_median(frame["card"], seconds, frame["amount"])
    frame["issuer_country"] = _COUNTRIES[cards.home[frame["card"].to_numpy()]]
    frame["card_id"] = [f"card-{c:05d}" for c in frame["card"]]
    return _finish(frame, "txn", ["card_id", *FRAUD_NUMERIC, *FRAUD_CATEGORICAL])


# ------------------------------------------------------------------------------- manufacturing


def generate_manufacturing(n: int, anomaly_fraction: float = 0.01, seed: int = 0) -> pd.DataFrame:
    """Machine sensor readings (every 30 s or slower); entity ``machine_id``; see the module doc."""
    _check(n, anomaly_fraction)
    rng = np.random.default_rng(seed)
    n_machines = int(np.clip(n // 2000, 3, 40))
    per = np.full(n_machines, n // n_machines)
    per[: n % n_machines] += 1
    # Every 30 s, or slower so that each machine's series covers two days (both shifts, nights).
    interval_s = float(max(30.0, np.ceil(2 * 86400.0 / per.min())))
    parts = [_machine_readings(rng, m, int(per[m]), interval_s) for m in range(n_machines)]
    frame = pd.concat(parts, ignore_index=True)
    frame["anomaly_kind"] = ""
    quotas = _quotas(round(n * anomaly_fraction), MANUFACTURING_KINDS)
    free = _FreeRows(n, rng)
    _drifts(frame, rng, free, quotas["drift"], per)
    _sensor_faults(frame, rng, free, quotas)
    return _manufacturing_columns(frame)


def _machine_readings(rng: np.random.Generator, m: int, k: int, interval_s: float) -> pd.DataFrame:
    """``k`` normal readings of machine ``m``, one every ``interval_s`` seconds."""
    t = rng.uniform(0, interval_s) + interval_s * np.arange(k)
    hour = (t / 3600.0) % 24.0
    # Two shifts from 06:00 to 22:00 run the line near full load; nights are light.
    shift = np.where((hour >= 6.0) & (hour < 22.0), 0.85, 0.3)
    # AR(1) fluctuation of the load (order of minutes).
    ar = lfilter([1.0], [1.0, -0.97], rng.normal(0, 0.05, k))
    load = np.clip(shift + ar + 0.05 * np.sin(2 * np.pi * t / 5400.0), 0.05, 1.4)
    g = rng.normal(1.0, 0.08, 5)  # this machine's gains
    current = 4.0 + 22.0 * g[0] * load + rng.normal(0, 0.6, k)
    flow = np.maximum(0.0, 45.0 * g[1] * load + rng.normal(0, 1.2, k))
    pressure = 1.2 + 0.06 * g[2] * flow + rng.normal(0, 0.08, k)
    ambient = 21.0 + 3.0 * np.sin(2 * np.pi * (hour - 9.0) / 24.0)
    temperature = ambient + 0.7 * g[3] * current + rng.normal(0, 0.4, k)
    vibration = 1.2 * g[4] * (0.5 + load) * rng.lognormal(0.0, 0.12, k)
    mode = np.where(load < 0.45, "idle", np.where(load > 1.1, "high_load", "run"))
    return pd.DataFrame(
        {
            "machine": m,
            "seconds": t,
            "load": load,
            "vibration_rms": vibration,
            "current_a": current,
            "pressure_bar": pressure,
            "temperature_c": temperature,
            "flow_lpm": flow,
            "mode": mode,
        }
    )


def _drifts(
    frame: pd.DataFrame, rng: np.random.Generator, free: _FreeRows, quota: int, per: np.ndarray
) -> None:
    """Drifts: a contiguous run of one machine's readings in which temperature (overheating) or
    vibration (bearing wear) creeps away from what the load explains."""
    bounds = np.r_[0, np.cumsum(per)]
    remaining = quota
    attempts = 0
    while remaining > 0 and attempts < 1000:
        attempts += 1
        m = int(rng.integers(len(per)))
        length = int(min(remaining, rng.integers(15, 60), per[m] // 2))
        if length < 1:
            continue
        start = bounds[m] + int(rng.integers(0, per[m] - length + 1))
        rows = np.arange(start, start + length)
        if not free.free[rows].all():
            continue
        free.free[rows] = False
        ramp = np.linspace(0.0, 1.0, length)
        if rng.random() < 0.5:
            frame.loc[rows, "temperature_c"] += 3.0 + 9.0 * ramp  # noise sd 0.4
        else:
            frame.loc[rows, "vibration_rms"] *= 1.6 + 1.6 * ramp
        frame.loc[rows, "anomaly_kind"] = "drift"
        remaining -= length


def _sensor_faults(
    frame: pd.DataFrame, rng: np.random.Generator, free: _FreeRows, quotas: dict[str, int]
) -> None:
    """The anomalies of one reading each: spikes, broken correlations, unseen modes."""
    rows = free.take(quotas["spike"])
    which = rng.integers(0, 3, len(rows))
    for j, col, factor in ((0, "vibration_rms", (3.0, 7.0)), (1, "current_a", (1.6, 2.2))):
        sel = rows[which == j]
        frame.loc[sel, col] *= rng.uniform(*factor, len(sel))
    sel = rows[which == 2]
    frame.loc[sel, "pressure_bar"] += rng.uniform(2.0, 4.0, len(sel))
    frame.loc[rows, "anomaly_kind"] = "spike"

    rows = free.take(quotas["broken_correlation"])
    blocked = rng.random(len(rows)) < 0.5
    sel, leak = rows[blocked], rows[~blocked]
    # Blocked line: the pump draws its usual current but flow collapses and pressure builds up.
    frame.loc[sel, "flow_lpm"] *= rng.uniform(0.1, 0.35, len(sel))
    frame.loc[sel, "pressure_bar"] += rng.uniform(0.8, 1.5, len(sel))
    # Leak: flow as usual but pressure falls away.
    frame.loc[leak, "pressure_bar"] = 1.2 + rng.uniform(0.0, 0.3, len(leak))
    frame.loc[rows, "anomaly_kind"] = "broken_correlation"

    rows = free.take(quotas["rare_category"])
    frame.loc[rows, "mode"] = rng.choice(_MODES_UNSEEN, len(rows))
    frame.loc[rows, "anomaly_kind"] = "rare_category"


def _manufacturing_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The published columns: event time, readings rounded, the machine id; sorted by time."""
    frame["event_time"] = START + pd.to_timedelta(np.round(frame["seconds"], 3), unit="s")
    frame = frame.round(
        {"vibration_rms": 4, "current_a": 3, "pressure_bar": 4, "temperature_c": 3, "flow_lpm": 3}
    )
    frame["machine_id"] = [f"machine-{m:03d}" for m in frame["machine"]]
    return _finish(
        frame, "reading", ["machine_id", *MANUFACTURING_NUMERIC, *MANUFACTURING_CATEGORICAL]
    )


GENERATORS: dict[str, Callable[..., pd.DataFrame]] = {
    "fraud": generate_fraud,
    "manufacturing": generate_manufacturing,
}


def generate(example: str, n: int, anomaly_fraction: float = 0.01, seed: int = 0) -> pd.DataFrame:
    try:
        fn = GENERATORS[example]
    except KeyError:
        raise ValueError(f"unknown example {example!r} (known: {', '.join(GENERATORS)})") from None
    return fn(n, anomaly_fraction, seed)


def split_train_stream(frame: pd.DataFrame, train_rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first ``train_rows`` records in time, without the anomalies among them and without
    the label columns (what a model is fit on), and the rest, labeled (what is replayed).

    Both parts come from the same cards or machines, the stream continuing where training ends:
    data generated separately with another seed would be a different fleet, and a detector would
    rightly flag much of it.
    """
    if not 0 < train_rows < len(frame):
        raise ValueError(f"train_rows must be in (0, {len(frame)}), got {train_rows}")
    head = frame.iloc[:train_rows]
    train = head[head["is_anomaly"] == 0].drop(columns=["is_anomaly", "anomaly_kind"])
    stream = frame.iloc[train_rows:].reset_index(drop=True)
    return train.reset_index(drop=True), stream


def write_frame(frame: pd.DataFrame, path: str) -> None:
    """Write CSV (ISO 8601 times) or Parquet, chosen by the file's suffix."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    elif lower.endswith(".csv"):
        out = frame.copy()
        out["event_time"] = out["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out.to_csv(path, index=False)
    else:
        raise ValueError(f"output file must end in .csv or .parquet: {path}")
