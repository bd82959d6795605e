"""The report's plots, as PNG files: training curves, score distributions, normalized REL
against attention, and ablations (a metric against gamma or rho).

Matplotlib (the ``report`` extra) is imported inside the plot functions, without pyplot (no
global backend state; PNG through Agg), so :mod:`sstoken.report` imports without it. Each PNG is
written atomically. A plot function returns None (and writes nothing) when its inputs lack the
fields it needs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..io import atomic_write
from ..records import ReportError, finite, token_states

KEPT, ATTN, DROP = "#1f6feb", "#f08c00", "#8c959f"   # plot colours: the page's blue, orange, grey
DPI = 150                # PNG resolution (crisp when zoomed; the page scales by it)


def _figure(w: float, h: float, rows: int = 1, cols: int = 1):
    """A figure without pyplot (no global backend state; PNG through Agg)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig, out_path: str | os.PathLike) -> str:
    """Lay out ``fig`` and write it as a PNG, atomically (the folder is created)."""
    fig.tight_layout()
    return str(atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png")))


def _log_history(state: Any) -> list[dict]:
    """``log_history`` from a trainer_state.json path, a run folder holding one, the parsed
    state, or the list itself."""
    if isinstance(state, list):
        return state
    if isinstance(state, dict):
        return state.get("log_history", [])
    p = Path(state)
    if p.is_dir():
        p = p / "trainer_state.json"
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("log_history", [])
    except FileNotFoundError as e:
        raise ReportError(f"{p}: no such trainer state") from e
    except json.JSONDecodeError as e:
        raise ReportError(f"{p}: invalid JSON ({e.msg})") from e


_SELECTION_STATS = (("sel/rel_mean", "mean REL"), ("sel/attn_mean", "mean attention score"),
                    ("sel/rel_attn_corr", "corr(REL, attention)"),
                    ("sel/attn_driven_frac", "kept mainly by attention"))


def plot_training(states: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Training curves of one or more runs, as PNGs in ``out_dir``.

    ``states`` maps a run label to its trainer_state.json (path, run folder, parsed dict or
    ``log_history`` list). Returns ``{"training loss": png, "kept fraction": png,
    "selection statistics": png}``, each only when some run logged that quantity (``loss``,
    ``sel/kept_frac``, and any of ``sel/rel_mean``, ``sel/attn_mean``, ``sel/rel_attn_corr``,
    ``sel/attn_driven_frac``).
    """
    out_dir = Path(out_dir)
    hist = {label: _log_history(s) for label, s in states.items()}

    def series(h: list[dict], key: str):
        return [(e["step"], e[key]) for e in h if finite(e.get(key)) and finite(e.get("step"))]

    paths: dict[str, str] = {}
    for key, ylabel, name, fname in (("loss", "loss (kept tokens)", "training loss", "training_loss"),
                                     ("sel/kept_frac", "kept fraction of response tokens",
                                      "kept fraction", "training_kept_frac")):
        lines = {label: series(h, key) for label, h in hist.items()}
        if not any(lines.values()):
            continue
        fig, (ax,) = _figure(4.6, 2.9)
        for label, pts in lines.items():
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 60 else None, label=label)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths[name] = _save(fig, out_dir / f"{fname}.png")
    present = [(k, t) for k, t in _SELECTION_STATS if any(series(h, k) for h in hist.values())]
    if present:
        cols = len(present)
        fig, axes = _figure(2.9 * cols + 0.3, 2.9, 1, cols)
        for ax, (key, label_) in zip(axes, present):
            for label, h in hist.items():
                pts = series(h, key)
                if pts:
                    ax.plot(*zip(*pts), label=label)
            ax.set_title(label_, fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_xlabel("optimizer step", fontsize=8)
            ax.tick_params(labelsize=8)
        for ax in axes[len(present):]:
            ax.set_visible(False)
        axes[0].legend(fontsize=7)
        paths["selection statistics"] = _save(fig, out_dir / "training_selection.png")
    return paths


def _response_values(rec: dict, key: str):
    """(value, state) of response positions with a finite ``key`` value."""
    vals = rec.get(key)
    if vals is None:
        return []
    return [(v, s) for v, s in zip(vals, token_states(rec)) if s != "p" and finite(v)]


def _panels(n: int, row_height: float):
    """A grid of ``n`` plot panels, at most 4 per row."""
    cols = min(4, n)
    rows = math.ceil(n / cols)
    return _figure(3.4 * cols + 0.3, row_height * rows, rows, cols)


def plot_score_histograms(records: list[dict], out_path: str | os.PathLike,
                          key: str = "score") -> str | None:
    """Distribution of the combined score of response tokens, one panel per method, stacked by
    outcome (not kept grey, kept blue, kept mainly by attention orange). None if no record has
    scores."""
    by_method: dict[str, list] = {}
    for r in records:
        pts = _response_values(r, key)
        if pts:
            by_method.setdefault(r["method"], []).extend(pts)
    if not by_method:
        return None
    n = len(by_method)
    fig, axes = _panels(n, 2.9)
    for ax, (m, pts) in zip(axes, by_method.items()):
        groups = [[v for v, s in pts if s == c] for c in "dka"]
        lo, hi = min(v for v, _ in pts), max(v for v, _ in pts)
        bins = 40 if hi > lo else 1
        ax.hist(groups, bins=bins, range=(lo, hi) if hi > lo else None, stacked=True,
                color=[DROP, KEPT, ATTN], label=["not kept", "kept", "kept by attention"])
        ax.set_title(m, fontsize=10)
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel("response tokens", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    return _save(fig, out_path)


def plot_rel_vs_attn(records: list[dict], out_path: str | os.PathLike,
                     max_points: int = 20000) -> str | None:
    """Normalized REL against attention score of response tokens, one panel per method that
    has both (at most ``max_points`` per panel, a fixed subsample); not kept grey, kept blue,
    kept mainly by attention orange, and the line (1-gamma) attn = gamma normREL where the
    method's records share one gamma. None if no record has both."""
    import random

    per: dict[str, dict] = {}
    for r in records:
        attn = r.get("attn_norm") if r.get("attn_norm") is not None else r.get("attn_score")
        if r.get("rel_norm") is None or attn is None:
            continue
        d = per.setdefault(r["method"], {"pts": [], "gammas": set()})
        d["gammas"].add(r.get("gamma"))
        d["pts"].extend((a, rn, s) for rn, a, s in zip(r["rel_norm"], attn, token_states(r))
                        if s != "p" and finite(rn) and finite(a))
    per = {m: d for m, d in per.items() if d["pts"]}
    if not per:
        return None
    n = len(per)
    fig, axes = _panels(n, 3.1)
    for ax, (m, d) in zip(axes, per.items()):
        pts = d["pts"]
        if len(pts) > max_points:
            pts = random.Random(0).sample(pts, max_points)
        for c, color, label in (("d", DROP, "not kept"), ("k", KEPT, "kept"),
                                ("a", ATTN, "kept by attention")):
            xs = [p[0] for p in pts if p[2] == c]
            ys = [p[1] for p in pts if p[2] == c]
            if xs:
                ax.scatter(xs, ys, s=4, alpha=0.45, color=color, label=label, linewidths=0)
        g = next(iter(d["gammas"])) if len(d["gammas"]) == 1 else None
        if finite(g) and 0 < g < 1:
            xmax = max(p[0] for p in pts) or 1.0
            ax.plot([0, xmax], [0, (1 - g) / g * xmax], color="#57606a", lw=0.8, ls="--",
                    label=f"(1-\u03b3)\u00b7attn = \u03b3\u00b7normREL (\u03b3={g:g})")
            ax.set_ylim(-0.04, 1.04)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("attention score (prompt mass; percentile under --normalize rank)", fontsize=9)
        ax.set_ylabel("normalized REL", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, markerscale=2.5, loc="upper right")
    for ax in axes[n:]:
        ax.set_visible(False)
    return _save(fig, out_path)


def plot_ablation(rows: list[dict], x: str, y: str, out_path: str | os.PathLike,
                  group: str = "method") -> str | None:
    """A metric ``y`` against ``x`` (``"gamma"`` or ``"rho"``), one line per ``group``.

    Rows are dicts like ``{"gamma": 0.5, "rho": 0.6, "method": "sstoken", "score": 41.2,
    "stderr": 0.8}``. One row at an x: the error bar is its ``stderr`` (or ``<y>_stderr``).
    Several rows at the same x (seeds): their mean, with the stderr of that mean over the rows
    (sd / sqrt(n)), which is the training noise the comparison has to beat. Rows missing ``x``
    or ``y`` are skipped; None if none is left.
    """
    from ..stats import mean_se

    series: dict[str, dict[float, list[tuple[float, float | None]]]] = {}
    for r in rows:
        if not (finite(r.get(x)) and finite(r.get(y))):
            continue
        err = r.get("stderr", r.get(f"{y}_stderr"))
        series.setdefault(str(r.get(group, y)), {}).setdefault(float(r[x]), []).append(
            (float(r[y]), float(err) if finite(err) else None))
    if not series:
        return None
    fig, (ax,) = _figure(4.6, 2.9)
    for name, pts in series.items():
        xs = sorted(pts)
        means = [sum(v for v, _ in pts[k]) / len(pts[k]) for k in xs]
        errs = [mean_se([v for v, _ in pts[k]])[1] if len(pts[k]) > 1 else (pts[k][0][1] or 0.0) for k in xs]
        has_err = any(len(pts[k]) > 1 or pts[k][0][1] is not None for k in xs)
        ax.errorbar(xs, means, yerr=errs if has_err else None, marker="o", capsize=3, label=name)
    ax.set_xlabel({"gamma": "\u03b3 (weight of REL)", "rho": "\u03c1 (kept fraction)"}.get(x, x), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.set_ylabel(y, fontsize=9)
    ax.set_title(f"{y} vs {x}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)
