"""``sstoken show``: records -> plots + one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..io import log
from .page import write_html
from .plots import plot_rel_vs_attn, plot_score_histograms, plot_training


def state_specs(specs: Iterable[str]) -> dict[str, str]:
    """``label=path`` or ``path`` (labelled by its run folder) -> {label: path}."""
    out = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            label, path = "", spec
        p = Path(path)
        out[label or (p.parent.name if p.is_file() else p.name) or path] = path
    return out


def show(records: list[dict], *, output: str | Path, title: str = "sstoken: selected tokens",
         trainer_state: Iterable[str] = (), max_examples: int = 1000) -> Path:
    """Write the page for the first ``max_examples`` example ids of ``records`` (every method's
    record of those examples), with the training plots of ``trainer_state`` (``[LABEL=]PATH``)
    and the score plots, into ``output`` and ``<output stem>_plots/``."""
    keep_ids = set(list(dict.fromkeys(r["id"] for r in records))[:max_examples])
    records = [r for r in records if r["id"] in keep_ids]
    out = Path(output)
    plot_dir = out.with_name(out.stem + "_plots")
    plots: dict[str, str] = {}
    states = state_specs(trainer_state)
    if states:
        plots.update(plot_training(states, plot_dir))
    for name, fn, fname in (("score distribution", plot_score_histograms, "scores.png"),
                            ("normalized REL vs attention", plot_rel_vs_attn, "rel_vs_attn.png")):
        p = fn(records, plot_dir / fname)
        if p:
            plots[name] = p
    write_html(records, out, title, plots)
    log(f"{len(keep_ids)} examples, {len(records)} records -> {out} "
        f"({out.stat().st_size / 1e6:.2f} MB); plots in {plot_dir}")
    return out
