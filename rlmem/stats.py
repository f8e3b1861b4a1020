"""Aggregate scores over runs and tasks with confidence intervals, as rliable does (Agarwal et al. 2021,
"Deep Reinforcement Learning at the Edge of the Statistical Precipice"), in numpy only.

Scores are arrays ``scores: [runs, tasks]`` (a run = one seed of one task); a missing run is ``NaN`` and
is left out, never counted as zero, so tasks may have different numbers of runs.

- :func:`normalize`: ``(score - random) / (optimal - random)``: 0 at the random policy, 1 at the optimum;
- :func:`iqm`: the interquartile mean of every run pooled over tasks (``scipy.stats.trim_mean(x, 0.25)``:
  sorted, ``floor(0.25 n)`` values cut at each end, the rest averaged);
- :func:`task_means`: the mean score of each task;
- :func:`stratified_bootstrap_ci`: a percentile confidence interval of any of these: runs are resampled with
  replacement *within each task* (stratified: a resample never moves a run to another task), the aggregate is
  recomputed per resample, and the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
  quantiles of those values; a seeded generator makes it reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: rliable's interquartile mean cuts this fraction of the sorted values at each end
IQM_CUT = 0.25


def normalize(score, random: float, optimal: float):
    """``(score - random) / (optimal - random)`` (any shape; NaN stays NaN). ``optimal`` must differ from
    ``random``: a task whose optimum is the random policy's score says nothing about memory."""
    if not np.isfinite(random) or not np.isfinite(optimal) or optimal == random:
        raise ValueError(f"normalize needs finite, distinct random and optimal levels, got {random}, {optimal}")
    return (np.asarray(score, dtype=float) - random) / (optimal - random)


def trimmed_mean(values, cut: float = IQM_CUT) -> np.ndarray:
    """Mean of the sorted ``values: [..., n]`` after cutting ``floor(cut * m)`` values at each end, with
    ``m`` the number of non-NaN values (the same in every leading index) -> ``[...]``.

    ``scipy.stats.trim_mean(x, cut)``'s rule: ``n = 7`` with ``cut = 0.25`` cuts 1 value at each end."""
    values = np.asarray(values, dtype=float)
    valid = ~np.isnan(values)
    counts = valid.sum(-1)
    m = int(counts.flat[0]) if counts.size else 0
    if counts.size and not (counts == m).all():
        raise ValueError("trimmed_mean needs the same number of non-NaN values in every row")
    if m == 0:
        return np.full(values.shape[:-1], np.nan)
    low = int(cut * m)
    ordered = np.sort(values, axis=-1)  # NaN sorts last
    return ordered[..., low:m - low].mean(-1)


def iqm(scores) -> np.ndarray:
    """Interquartile mean of ``scores: [..., runs, tasks]`` -> ``[...]``: every run of every task pooled,
    the lowest and highest 25% cut (:func:`trimmed_mean`), NaN (missing) left out."""
    scores = np.asarray(scores, dtype=float)
    return trimmed_mean(scores.reshape(*scores.shape[:-2], -1))


def task_means(scores) -> np.ndarray:
    """Mean over runs of ``scores: [..., runs, tasks]`` -> ``[..., tasks]`` (NaN left out; NaN for a task
    without runs)."""
    scores = np.asarray(scores, dtype=float)
    counts = (~np.isnan(scores)).sum(-2)
    total = np.where(np.isnan(scores), 0.0, scores).sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def mean_score(scores) -> np.ndarray:
    """Mean of the task means of ``scores: [..., runs, tasks]`` -> ``[...]``."""
    return task_means(scores).mean(-1)


def stratified_resamples(scores, reps: int, rng: np.random.Generator) -> np.ndarray:
    """``reps`` stratified bootstrap resamples of ``scores: [runs, tasks]`` -> ``[reps, runs, tasks]``.

    Task ``j`` with ``n_j`` finished runs gets ``n_j`` draws with replacement from its own runs in rows
    ``0 .. n_j - 1``; its remaining rows stay NaN, so every resample has each task's number of runs."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [runs, tasks], got shape {scores.shape}")
    runs, tasks = scores.shape
    out = np.full((reps, runs, tasks), np.nan)
    for j in range(tasks):
        found = scores[~np.isnan(scores[:, j]), j]
        if len(found):
            out[:, :len(found), j] = found[rng.integers(len(found), size=(reps, len(found)))]
    return out


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval ``[low, high]``."""

    value: float
    low: float
    high: float

    def text(self, digits: int = 2) -> str:
        """``0.52 [0.41, 0.63]``, or ``-`` when there is no estimate."""
        if np.isnan(self.value):
            return "-"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high


def stratified_bootstrap_ci(scores, statistic: Callable[[np.ndarray], np.ndarray], reps: int = 10_000,
                            confidence: float = 0.95, seed: int = 0) -> Interval:
    """``statistic`` of ``scores: [runs, tasks]`` with its stratified-bootstrap percentile interval.

    ``statistic`` maps ``[..., runs, tasks]`` (NaN = missing) to ``[...]`` (e.g. :func:`iqm`, :func:`mean_score`);
    it is evaluated on ``reps`` resamples (:func:`stratified_resamples`, generator seeded with ``seed``). All
    NaN scores give NaN everywhere (a missing result, not a zero)."""
    if reps < 1 or not 0 < confidence < 1:
        raise ValueError(f"need reps >= 1 and 0 < confidence < 1, got {reps}, {confidence}")
    scores = np.asarray(scores, dtype=float)
    if scores.size == 0 or np.isnan(scores).all():
        return Interval(np.nan, np.nan, np.nan)
    point = float(statistic(scores))
    values = statistic(stratified_resamples(scores, reps, np.random.default_rng(seed)))
    low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(point, float(low), float(high))
