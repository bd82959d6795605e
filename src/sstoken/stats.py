"""Statistics over repeated runs: means with their stderr, Student-t intervals, seed pairing.

Pure functions, no I/O. Runs repeated over seeds are named ``<group>-seed<N>`` (as ``sstoken
sweep`` names them); :func:`seed_groups` parses such labels, and :func:`paired_difference`
compares two groups seed by seed (same seed = same data order, LoRA init and dropout).

scipy (for :func:`t95`) is imported inside the function, so this module imports without it.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

_SEED = re.compile(r"^(?P<group>.+)-seed(?P<seed>\d+)$")


def mean_se(xs: list[float]) -> tuple[float, float | None]:
    """Mean of repeated measurements and the stderr of that mean, sd (n-1) / sqrt(n)."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None)


def t95(n: int) -> float:
    """Two-sided 95% quantile of Student's t with n-1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def seed_groups(labels: list[str]) -> dict[str, dict[int, int]]:
    """``{group: {seed: index}}`` for labels named ``<group>-seed<N>`` (as ``sweep`` names runs);
    any other label is a group of its own with seed -1."""
    groups: dict[str, dict[int, int]] = {}
    for i, label in enumerate(labels):
        m = _SEED.match(label)
        g, seed = (m["group"], int(m["seed"])) if m else (label, -1)
        if seed in groups.setdefault(g, {}):
            raise ValueError(f"two runs named {label}")
        groups[g][seed] = i
    return groups


def paired_seeds(a: Mapping[int, object], b: Mapping[int, object]) -> list[int]:
    """The seeds two groups share, in ``a``'s order; seed -1 (a run without seeds) never pairs."""
    return [s for s in a if s in b and s >= 0]


def paired_difference(a: Mapping[int, float | None],
                      b: Mapping[int, float | None]) -> tuple[float, float, float, float] | None:
    """``a - b`` paired by seed: ``(mean, stderr, low, high)`` with the 95% t-interval
    ``mean ± t95(n) * stderr`` over the n shared seeds (:func:`paired_seeds`).

    None when fewer than two seeds pair, or when a shared seed lacks a value (None) in either
    group: a difference over a subset of the seeds would not be the one asked for.
    """
    common = paired_seeds(a, b)
    ds = [a[s] - b[s] for s in common if a[s] is not None and b[s] is not None]
    if len(ds) < 2 or len(ds) != len(common):
        return None
    m, se = mean_se(ds)
    h = t95(len(ds)) * se
    return m, se, m - h, m + h
