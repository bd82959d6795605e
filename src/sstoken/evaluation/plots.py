"""The comparison bar plot (``compare.png``). matplotlib is imported inside the function."""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_write
from .tables import cells_of, group_means
from .tasks import is_loss, primary


def bar_plot(reports: list[dict], labels: list[str], path: str | os.PathLike,
             groups: dict[str, dict[int, int]] | None = None) -> str:
    """Grouped bars of each task's primary metric; with ``groups``, one bar per seed group
    (mean over seeds, error bar = stderr over seeds). The held-out loss, when present, gets
    its own panel (nats, lower is better). Writes a PNG to ``path``; returns the path."""
    from matplotlib.figure import Figure

    cells = [cells_of(r) for r in reports]
    if groups:
        cells, labels = group_means(cells, groups), list(groups)
    tasks = [t for t in dict.fromkeys(t for c in cells for t in c) if not is_loss(t)]
    losses = [t for t in dict.fromkeys(t for c in cells for t in c) if is_loss(t)]
    if not tasks and losses:
        return _loss_only(cells, labels, losses, path, bool(groups))
    fig = Figure(figsize=(max(6, 1.3 * len(tasks) + 2) + 2.5 * bool(losses), 3.8))
    axes = fig.subplots(1, 1 + bool(losses), squeeze=False,
                        gridspec_kw={"width_ratios": [max(1, len(tasks))] + [1.2] * bool(losses)})
    ax = axes[0][0]
    width = 0.8 / max(1, len(cells))
    for k, (label, c) in enumerate(zip(labels, cells)):
        xs = [i + k * width for i in range(len(tasks))]
        ys = [c.get(t, (None, None))[0] or 0 for t in tasks]
        es = [c.get(t, (None, None))[1] or 0 for t in tasks]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=label)
        if losses:
            lv = c.get(losses[0], (None, None))
            axes[0][1].bar([k], [lv[0] or 0], 0.8, yerr=[lv[1] or 0], capsize=2, color=f"C{k % 10}")
    if losses:
        a2 = axes[0][1]
        a2.set_title(f"{losses[0]} {primary(losses[0])} (nats, lower is better)", fontsize=8)
        a2.set_xticks([])
        vals = [c[losses[0]][0] for c in cells if c.get(losses[0], (None,))[0] is not None]
        if vals:
            lo, hi = min(vals), max(vals)
            pad = max(hi - lo, 1e-3)
            a2.set_ylim(lo - pad, hi + pad)
        a2.grid(axis="y", alpha=0.3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n({primary(t)})" for t in tasks], rotation=20, fontsize=8)
    ax.set_ylabel("score (%)  ± stderr" + ("  (mean over seeds)" if groups else ""))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return str(atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110)))


def _loss_only(cells: list[dict], labels: list[str], tasks: list[str], path, grouped: bool) -> str:
    """No benchmark ran (held-out losses only): one panel per held-out set, one labelled bar
    per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5, 0.9 * len(cells) + 2) * len(tasks), 3.8))
    for ax, task in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks):
        vals = [c.get(task, (None, None)) for c in cells]
        ax.bar(range(len(cells)), [v[0] or 0 for v in vals], 0.7, yerr=[v[1] or 0 for v in vals],
               capsize=3, color=[f"C{k % 10}" for k in range(len(cells))])
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(f"{task} {primary(task)} (nats, lower is better)"
                      + ("\nmean over seeds ± stderr" if grouped else ""))
        got = [v[0] for v in vals if v[0] is not None]
        if got:
            pad = max(max(got) - min(got), 1e-3) * 0.3
            ax.set_ylim(min(got) - pad, max(got) + pad)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return str(atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110)))
