"""What each duplicated scoring step costs on the CPU: the numpy path against its twin.

    python bench/duplicate_paths.py [--rows 100000 2048] [--repeat 7]

Fits a small model (VAE + flow + GAN + knn, 150 steps each: only preprocessing and calibration
are timed, never the networks) on ``bench/scoring.py``'s generated rows (30 features), then times,
best of ``--repeat``, 1 thread, for each batch size in ``--rows``:

- the quantile transform's knot lookup: ``KnotLookupBlock`` over the whole block, the same in the
  2,048-row chunks ``Preprocessor.transform`` uses, ``KnotLookup`` per column, ``np.interp`` per
  column;
- the whole numeric+categorical transform: ``Preprocessor.transform`` (numpy) against
  ``DevicePreprocessor.transform`` (torch) run on the CPU;
- extracting the numeric block: the one-block fast path against the per-column path that text and
  nullable columns take;
- ``validate_frame`` on clean data against the per-row scan (``row_problems``) it skips;
- conformal and tail p-values: ``Calibrator`` (numpy, grid search) against ``DeviceCalibrator``
  (torch) on the CPU, and plain ``np.searchsorted``;
- the ensemble: ``ensemble.combine`` (numpy) against ``device_scoring.combine`` (torch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import make_rows


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e3 * min(times), 2)


def measure(model, n: int, repeat: int) -> dict[str, float]:
    from anomaly.estimator.ensemble import combine as numpy_combine
    from anomaly.features.columns import row_problems
    from anomaly.features.knot_lookup import row_sized_ufunc_buffers
    from anomaly.features.preprocess import BLOCK_ROWS
    from anomaly.scoring.device_scoring import (
        DeviceCalibrator,
        DevicePreprocessor,
        host_inputs,
    )
    from anomaly.scoring.device_scoring import combine as torch_combine

    pre = model.preprocessor_
    cpu = torch.device("cpu")
    rows = make_rows(n, len(pre.feature_names_in_), np.random.default_rng(1))
    frame = pd.DataFrame(rows, columns=pre.feature_names_in_)
    plan = pre._block_plan()
    xq = np.ascontiguousarray(rows.T, dtype=np.float64)[plan.quantile]
    lookups = plan.lookup.lookups

    def block_in_chunks() -> None:
        for r0 in range(0, n, BLOCK_ROWS):
            chunk = np.ascontiguousarray(xq[:, r0 : r0 + BLOCK_ROWS])
            with row_sized_ufunc_buffers(chunk.shape[1]):
                plan.lookup(chunk.T)

    out = {
        "knots_block": best_ms(lambda: plan.lookup(xq.T), repeat),
        "knots_block_in_chunks": best_ms(block_in_chunks, repeat),
        "knots_per_column": best_ms(lambda: [lk(xq[i]) for i, lk in enumerate(lookups)], repeat),
        "knots_np_interp": best_ms(
            lambda: [np.interp(xq[i], lk.knots, lk.values) for i, lk in enumerate(lookups)], repeat
        ),
        "transform_numpy": best_ms(lambda: pre.transform(frame), repeat),
    }
    device_pre = DevicePreprocessor(pre, cpu)
    values, codes = host_inputs(pre, frame)
    tv, tc = torch.from_numpy(values), [torch.from_numpy(c) for c in codes]
    out["transform_torch_cpu"] = best_ms(lambda: device_pre.transform(tv, tc), repeat)
    out["extract_block"] = best_ms(lambda: pre._numeric_block(frame), repeat)
    out["extract_per_column"] = best_ms(lambda: pre._checked_numeric_columns(frame), repeat)
    out["validate_fast"] = best_ms(lambda: pre.validate_frame(frame), repeat)
    out["validate_scan"] = best_ms(
        lambda: row_problems(frame, pre.numeric_, pre.categorical_, False), repeat
    )
    cal = model.calibrators_["vae"]
    rng = np.random.default_rng(2)
    s = rng.choice(cal.scores_, n) * rng.uniform(0.9, 1.1, n)
    ts, device_cal = torch.from_numpy(s), DeviceCalibrator(cal, cpu)
    out["pvalues_numpy"] = best_ms(lambda: cal.tail_pvalues(s, pvalues=cal.pvalues(s)), repeat)
    out["pvalues_torch_cpu"] = best_ms(
        lambda: device_cal.tail_pvalues(ts, device_cal.pvalues(ts)), repeat
    )
    out["pvalues_np_searchsorted"] = best_ms(lambda: np.searchsorted(cal.scores_, s), repeat)
    ps = [np.random.default_rng(i).uniform(1e-6, 1.0, n) for i in range(4)]
    tps, weights = [torch.from_numpy(p) for p in ps], [1 / 6, 1 / 6, 1 / 6, 1 / 2]
    out["combine_numpy"] = best_ms(lambda: numpy_combine(ps, weights), repeat)
    out["combine_torch_cpu"] = best_ms(lambda: torch_combine(tps, weights), repeat)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 2_048])
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    from anomaly import AnomalyModel

    torch.set_num_threads(1)
    train = make_rows(20_000, args.features, np.random.default_rng(0))
    model = AnomalyModel(
        target_fpr=0.001, seed=0, device="cpu", max_steps=150, min_steps=50, max_epochs=5
    ).fit(train)
    result = {f"{n}_rows_ms": measure(model, n, args.repeat) for n in args.rows}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
