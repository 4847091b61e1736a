"""Retention at equal task score: an optimizer's runs against another's frontier.

Each optimizer's learning-rate grid traces a frontier of task score against retention of the
pretrained skill (a higher rate usually buys task score with retention). Comparing two optimizers
at their tuned rates mixes the two axes; comparing at equal task score does not: for each seed of
an optimizer at its chosen rate, the reference's retention at that seed's task score is read off
the reference's frontier (its Pareto-optimal grid points, linearly interpolated), and the
difference is averaged over seeds with a 95 % interval. The reference frontier comes from one
seed per rate, so the interval covers the compared optimizer's seed spread only.

Where the two frontiers do not overlap in task score, no equal-score comparison exists; then
``paired_dominance`` asks the frontier question directly: is a point beaten on both axes by one
of the reference's points (paired by seed, where both ran every seed at every rate)?
"""

from __future__ import annotations

from collections.abc import Sequence

from .stats import judged_difference


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (score, retention) that no other point beats on both, sorted by score."""
    clean = [(s, r) for s, r in points if s is not None and r is not None and s == s and r == r]
    front = [p for p in clean if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in clean)]
    return sorted(set(front))


def retention_on_front(front: Sequence[tuple[float, float]], score: float) -> float | None:
    """The front's retention at ``score`` (linear between its points); None outside its score range."""
    if not front or score < front[0][0] or score > front[-1][0]:
        return None
    for (s0, r0), (s1, r1) in zip(front, front[1:]):
        if s0 <= score <= s1:
            return r0 if s1 == s0 else r0 + (r1 - r0) * (score - s0) / (s1 - s0)
    return front[0][1]  # a front of one point, at exactly its score


def retention_at_equal_score(cell: dict, reference: dict) -> dict:
    """``cell``'s per-seed retention minus ``reference``'s frontier retention at the same task
    score (validation), with its interval; seeds whose score lies outside the reference's range
    are counted apart (``above`` / ``below`` its best / worst frontier score)."""
    front = pareto_front([(row["validation"], row["retention"]) for row in reference["grid"]])
    diffs, above, below = [], 0, 0
    for score, retention in zip(cell["scores"], cell["retention"]):
        if score is None or retention is None:
            continue
        at = retention_on_front(front, score)
        if at is None:
            above += bool(front) and score > front[-1][0]
            below += bool(front) and score < front[0][0]
            continue
        diffs.append(retention - at)
    return {**judged_difference(diffs), "seeds_above_front": above, "seeds_below_front": below, "front": front}


def paired_dominance(point: dict[str, Sequence[float | None]], reference: dict[str, dict[str, Sequence[float | None]]],
                     level: float = 0.95) -> dict:
    """Whether one frontier point (per-seed ``score`` and ``retention``, seed-aligned lists) is
    beaten on both axes by a reference point, or beats one, by paired per-seed intervals.

    Each reference point (``{label: {"score": [...], "retention": [...]}}``, the same seeds in the
    same order) gives two paired differences, ``point - reference``. ``dominated_by`` lists the
    labels whose both intervals lie below zero, ``dominates`` those whose both lie above. The
    intervals are Bonferroni-widened over the reference points (level ``1 - (1 - level) / k``),
    since the reference point is picked after looking at all ``k``."""
    k = max(1, len(reference))
    widened = 1 - (1 - level) / k
    pairs, dominated_by, dominates = {}, [], []
    for label, ref in reference.items():
        diffs = {axis: judged_difference([a - b for a, b in zip(point[axis], ref[axis])
                                          if a is not None and b is not None], widened)
                 for axis in ("score", "retention")}
        pairs[label] = diffs
        if all(d["hi"] < 0 for d in diffs.values()):
            dominated_by.append(label)
        if all(d["lo"] > 0 for d in diffs.values()):
            dominates.append(label)
    return {"dominated_by": dominated_by, "dominates": dominates, "level": widened, "pairs": pairs}
