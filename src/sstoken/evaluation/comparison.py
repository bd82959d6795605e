"""``compare``: several evaluations side by side, as markdown tables and a bar plot."""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_write
from ..stats import seed_groups
from .tables import load_eval, results_table, seeds_table


def compare(inputs: list[str], out_dir: str | os.PathLike, *, labels: list[str] | None = None,
            baseline: str | None = "full") -> dict:
    """Put several evaluations side by side.

    ``inputs``: ``eval.json`` files or folders holding one; ``labels``: row names (default:
    the folder names). Writes ``compare.md`` (see :func:`results_table`; when runs are repeated
    over seeds, ``<name>-seed<N>``, also :func:`seeds_table` with differences to ``baseline``)
    and ``compare.png`` (grouped bars with stderr error bars; one bar per seed group, with the
    stderr over seeds, when there are seeds) into ``out_dir``; returns ``{"table": path,
    "plot": path, "markdown": the tables}``.
    """
    from .plots import bar_plot

    reports = [load_eval(p) for p in inputs]
    labels = labels or [Path(p).name if Path(p).is_dir() else Path(p).resolve().parent.name
                        for p in inputs]
    if len(labels) != len(reports):
        raise ValueError(f"{len(labels)} labels for {len(reports)} inputs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(reports, labels)
    groups = seed_groups(labels)
    repeated = any(len(s) > 1 for s in groups.values())
    if repeated:
        table = seeds_table(reports, labels, baseline) + "\nEvery run:\n\n" + table
    atomic_write(out / "compare.md", table)
    png = bar_plot(reports, labels, out / "compare.png", groups if repeated else None)
    return {"table": str(out / "compare.md"), "plot": png, "markdown": table}
