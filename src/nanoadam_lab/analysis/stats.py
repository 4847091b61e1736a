"""The statistics every comparison reports: paired intervals over seeds, verdicts read from them,
and the bootstrap standard error of a score difference on one evaluation set (the gate that a
task learns). Verdicts follow intervals, never the sign of a mean."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

HIGHER, LOWER, UNDECIDED = "higher", "lower", "no difference detected"


def paired_interval(differences: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of per-seed differences with its Student-t interval (``lo``/``hi`` are NaN below 2 seeds)."""
    from scipy.stats import t

    d = np.asarray([x for x in differences if x == x], dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": n}
    half = float(t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def verdict(interval: dict[str, float]) -> str:
    """``higher`` when the whole interval is above zero, ``lower`` when below, else undecided."""
    if interval["lo"] > 0:
        return HIGHER
    if interval["hi"] < 0:
        return LOWER
    return UNDECIDED


def judged_difference(differences: Sequence[float], level: float = 0.95) -> dict:
    """:func:`paired_interval` of per-seed differences with the :func:`verdict` it supports
    (``"too few seeds"`` below two)."""
    interval = paired_interval(differences, level)
    return {**interval, "verdict": verdict(interval) if interval["n"] >= 2 else "too few seeds"}


def rowwise_score(metric: str, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The metric of every row of ``(rows, n)`` predictions against labels: ``accuracy``,
    ``matthews`` (binary) or ``pearson``; an undefined correlation (a constant row) scores 0."""
    if metric == "accuracy":
        return (predictions == labels).mean(axis=1)
    if metric == "matthews":
        p, y = predictions.astype(bool), labels.astype(bool)
        tp, tn = (p & y).sum(1).astype(float), (~p & ~y).sum(1).astype(float)
        fp, fn = (p & ~y).sum(1).astype(float), (~p & y).sum(1).astype(float)
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1), 0.0)
    if metric == "pearson":
        p = predictions - predictions.mean(1, keepdims=True)
        y = labels - labels.mean(1, keepdims=True)
        denom = np.sqrt((p * p).sum(1) * (y * y).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, (p * y).sum(1) / np.where(denom > 0, denom, 1), 0.0)
    raise ValueError(f"unknown metric {metric!r}")


def bootstrap_difference(metric: str, first: Sequence[Sequence[float]], second: Sequence[Sequence[float]],
                         labels: Sequence[float], resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Difference of mean scores, ``first`` minus ``second`` (each a list of per-seed predictions
    on the same examples), and its standard error from resampling the examples (the same
    resample for every seed and both sides: paired)."""
    y = np.asarray(labels, dtype=float)
    a = np.asarray(first, dtype=float).reshape(-1, len(y))
    b = np.asarray(second, dtype=float).reshape(-1, len(y))
    full = rowwise_score(metric, a, np.broadcast_to(y, a.shape)).mean() - \
        rowwise_score(metric, b, np.broadcast_to(y, b.shape)).mean()
    idx = np.random.default_rng(seed).integers(0, len(y), size=(resamples, len(y)))
    yy = y[idx]
    diffs = np.mean([rowwise_score(metric, row[idx], yy) for row in a], axis=0) - \
        np.mean([rowwise_score(metric, row[idx], yy) for row in b], axis=0)
    return {"difference": float(full), "se": float(diffs.std(ddof=1)), "resamples": resamples}
