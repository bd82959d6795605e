"""Markdown tables of evaluations: one row per run, or per seed group with paired differences.

A report is the dict of an ``eval.json`` (see :func:`sstoken.evaluation.evaluate`). Its cells
are ``{task: (primary metric, its stderr)}`` (:func:`cells_of`): benchmark fractions shown in
%, the held-out loss in nats. No I/O here except :func:`load_eval` reading one file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..stats import mean_se, paired_difference, paired_seeds, seed_groups
from .tasks import is_loss, primary

Cells = dict[str, tuple[float | None, float | None]]


def finite_number(v: Any) -> float | None:
    """A finite number, else None (lm-eval writes ``"N/A"`` or nan for a missing stderr)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return v
    return None


def load_eval(path: str | os.PathLike) -> dict:
    """An ``eval.json``, given the file or a run folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no eval.json (run `sstoken eval` first)")
    return json.loads(p.read_text())


def _scale(task: str) -> float:
    """Benchmark fractions are shown in %, the held-out loss in nats."""
    return 1.0 if is_loss(task) else 100.0


def cells_of(report: dict) -> Cells:
    """``{task: (primary metric, its stderr)}`` of one report (benchmarks in %, the loss in nats)."""
    out = {}
    for task, metrics in report["results"].items():
        metric = primary(task)
        if metric not in metrics:
            metric = next((k for k in metrics if not k.endswith("_stderr")), None)
        if metric is None:
            continue
        v, se = finite_number(metrics.get(metric)), finite_number(metrics.get(f"{metric}_stderr"))
        k = _scale(task)
        out[task] = (None if v is None else k * v, None if se is None else k * se)
    return out


def with_average(cells: list[Cells]) -> tuple[list[Cells], list[str]]:
    """Add an ``average`` over the benchmarks (not the held-out loss) to each row of cells,
    only for rows that have every benchmark. Returns the rows (the same dicts, updated) and the
    column order: benchmarks, ``average``, then the losses."""
    tasks = list(dict.fromkeys(t for c in cells for t in c))
    bench = [t for t in tasks if not is_loss(t)]
    for c in cells:
        vals = [c[t][0] for t in bench if t in c and c[t][0] is not None]
        c["average"] = (sum(vals) / len(vals) if vals and len(vals) == len(bench) else None, None)
    return cells, bench + ["average"] + [t for t in tasks if is_loss(t)]


def _header(cols: list[str]) -> str:
    def name(t):
        if t == "average":
            return "average"
        return f"{t} ({primary(t)}{', lower is better' if is_loss(t) else ''})"
    return "| run | " + " | ".join(name(t) for t in cols) + " |\n|" + " --- |" * (len(cols) + 1)


def _fmt_cell(v: float | None, se: float | None, task: str, bold: bool) -> str:
    if v is None:
        return "-"
    d = 4 if is_loss(task) else 1
    s = f"{v:.{d}f}" + (f" ± {se:.{d}f}" if se is not None else "")
    return f"**{s}**" if bold else s


def _best(cells: list[dict], t: str) -> float | None:
    vals = [c[t][0] for c in cells if t in c and c[t][0] is not None]
    if not vals:
        return None
    return min(vals) if is_loss(t) else max(vals)


def results_table(reports: list[dict], labels: list[str]) -> str:
    """Markdown: rows = runs, columns = tasks (primary metric, mean ± stderr; benchmarks in %,
    the held-out loss in nats) and an average of the benchmarks (only for a run that has every
    one); the best of each column (highest, or lowest for a loss) in bold."""
    cells, cols = with_average([cells_of(r) for r in reports])
    best = {t: _best(cells, t) for t in cols}
    lines = [_header(cols)]
    for label, c in zip(labels, cells):
        row = [_fmt_cell(*c.get(t, (None, None)), t, best[t] is not None and c.get(t, (None,))[0] is not None
                         and abs(c[t][0] - best[t]) < 1e-9) for t in cols]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def group_means(cells: list[Cells], groups: dict[str, dict[int, int]],
                complete: bool = False) -> list[dict[str, tuple[float, float | None, int]]]:
    """Per seed group (in ``groups``' order): ``{task: (mean over seeds, stderr of that mean,
    n)}`` from the rows ``cells``. ``complete``: only tasks every seed of the group has."""
    out = []
    for seeds in groups.values():
        row = {}
        for t in dict.fromkeys(t for c in cells for t in c):
            xs = [cells[i][t][0] for i in seeds.values() if cells[i].get(t, (None,))[0] is not None]
            if xs and (len(xs) == len(seeds) or not complete):
                row[t] = (*mean_se(xs), len(xs))
        out.append(row)
    return out


def seeds_table(reports: list[dict], labels: list[str], baseline: str | None = "full") -> str:
    """Markdown for runs repeated over seeds: each group's mean over seeds ± the stderr of that
    mean (sd / sqrt(n), n = seeds), and, when ``baseline`` is a group, each group's difference
    to it paired by seed (same seed = same data order, LoRA init and dropout) with its 95%
    t-interval; a difference whose interval excludes 0 is in bold."""
    cells, cols = with_average([cells_of(r) for r in reports])
    groups = seed_groups(labels)
    stat = group_means(cells, groups, complete=True)
    rows = [{t: v[:2] for t, v in s.items() if t in cols} for s in stat]
    best = {t: _best(rows, t) for t in cols}
    lines = ["Mean over seeds ± stderr of the mean (n = seeds; '-' where not every seed of the "
             "group has the task, e.g. benchmarks run for some seeds only):", "",
             _header(cols).replace("| run |", "| run (n) |", 1)]
    for g, s, row in zip(groups, stat, rows):
        n = max((v[2] for v in s.values()), default=0)
        cellstr = [_fmt_cell(*row.get(t, (None, None)), t, best[t] is not None and t in row
                             and abs(row[t][0] - best[t]) < 1e-9) for t in cols]
        lines.append(f"| {g} ({n}) | " + " | ".join(cellstr) + " |")
    if baseline not in groups:
        return "\n".join(lines) + "\n"
    lines += ["", f"Difference to {baseline}, paired by seed: mean ± stderr [95% t-interval]; "
              "bold when the interval excludes 0 (benchmarks in points of %, the loss in nats; "
              "a negative loss difference is better):", "", _header(cols)]
    base = groups[baseline]
    for g, seeds in groups.items():
        if g == baseline or not paired_seeds(seeds, base):
            continue                                   # e.g. the base model: no seeds to pair
        row = []
        for t in cols:
            diff = paired_difference({s: cells[i].get(t, (None,))[0] for s, i in seeds.items()},
                                     {s: cells[i].get(t, (None,))[0] for s, i in base.items()})
            if diff is None:
                row.append("-")
                continue
            m, se, lo, hi = diff
            d = 4 if is_loss(t) else 1
            s = f"{m:+.{d}f} ± {se:.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]"
            row.append(f"**{s}**" if (lo > 0 or hi < 0) else s)
        lines.append(f"| {g} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
