"""Statistics of the hybrid benchmark (AlgoPerf-style): time to a target, medians over seeds, paired bootstrap.

- steps / seconds to target: the first evaluation whose validation loss is ≤ the target; a run that never gets
  there counts as infinite (math.inf), so a method that misses on most seeds has an infinite median.
- A ratio "method / reference" of medians is computed on paired resamples of the seeds (the same seeds drawn for
  both, since seed s of every method sees the same initial weights and data order): 95 % percentile interval over
  `n_boot` resamples. Conventions for misses: x/∞ = 0, ∞/x = ∞, ∞/∞ = 1 (both missed: no evidence either way).
  A "win" (lower is better) needs the whole interval below 1; a "loss" the whole interval above 1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

INF = math.inf


def first_reaching(evals: Sequence[dict], target: float, key: str = "step") -> float:
    """`key` ("step", "train_s", "train_cpu_s") at the first evaluation with val_loss ≤ target; inf when none."""
    for row in evals:
        if math.isfinite(row["val_loss"]) and row["val_loss"] <= target:
            return float(row[key])
    return INF


def median(values: Sequence[float]) -> float:
    """Median that keeps infinities (numpy's median of [1, inf, inf] is inf, of [1, 2, inf] is 2)."""
    arr = np.asarray(values, dtype=float)
    return float(np.median(arr)) if len(arr) else math.nan


def ratio(a: float, b: float) -> float:
    """One `ratios`."""
    return float(ratios(a, b))


def ratios(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b elementwise, with the conventions for misses: x/∞ = 0, ∞/x = ∞, ∞/∞ = 1, 0/0 = 1, x/0 = ∞."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(b != 0, a / np.where(b != 0, b, 1.0), np.where(a == 0, 1.0, INF))
    out = np.where(np.isinf(a), INF, out)
    out = np.where(np.isinf(b), 0.0, out)
    return np.where(np.isinf(a) & np.isinf(b), 1.0, out)


def paired_bootstrap_ratio(method: Sequence[float], reference: Sequence[float], n_boot: int = 4000,
                           seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): median(method)/median(reference) and its 95 % paired-bootstrap interval."""
    m, r = np.asarray(method, dtype=float), np.asarray(reference, dtype=float)
    if len(m) != len(r) or len(m) == 0:
        raise ValueError(f"paired samples need equal, non-zero lengths (got {len(m)} and {len(r)})")
    point = ratio(median(m), median(r))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m), size=(n_boot, len(m)))
    # Every draw at once: the report computes ~170 of these intervals, a Python loop over draws took ~30 CPU-s.
    boot = ratios(np.median(m[idx], axis=1), np.median(r[idx], axis=1))
    # "lower"/"higher": an order statistic, never an interpolation between two infinities
    low = float(np.percentile(boot, 2.5, method="lower"))
    high = float(np.percentile(boot, 97.5, method="higher"))
    return point, float(low), float(high)


def verdict(low: float, high: float) -> str:
    """'win' when the interval is entirely below 1 (lower is better), 'loss' when entirely above, else 'tie'."""
    if high < 1.0:
        return "win"
    if low > 1.0:
        return "loss"
    return "tie"


def count_spikes(val_losses: Sequence[float], threshold: float = 0.05) -> int:
    """Evaluations whose validation loss is more than `threshold` (relative) above the best one before them."""
    best, spikes = math.inf, 0
    for value in val_losses:
        if not math.isfinite(value):
            spikes += 1
            continue
        if value > best * (1.0 + threshold):
            spikes += 1
        best = min(best, value)
    return spikes


def count_train_spikes(losses: Sequence[float], window: int = 20, threshold: float = 0.5) -> int:
    """Steps whose training loss exceeds the median of the previous `window` steps by more than `threshold`."""
    arr = np.asarray(losses, dtype=float)
    spikes = 0
    for t in range(window, len(arr)):
        ref = np.median(arr[t - window:t])
        if not math.isfinite(arr[t]) or arr[t] > ref * (1.0 + threshold):
            spikes += 1
    return spikes


def relative_spread(values: Sequence[float]) -> float:
    """Coefficient of variation (std / mean) across seeds — the guide's "±x % variance" reads as this."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(arr) < 2 or arr.mean() == 0:
        return math.nan
    return float(arr.std(ddof=1) / abs(arr.mean()))
