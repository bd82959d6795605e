"""Tables and plots of study v3 (configs/study-v3.yaml) for docs/results.md.

    .venv/bin/python bench/study_v3.py outputs/study-v3

Reads every run's eval.json (held-out loss on GSM8K and on ShareGPT), trainer_state.json
(training loss, attention-driven fraction, rho) and selection.jsonl (the kept fraction by
token class), pairs runs by seed, and writes docs/results/study_v3.json, study_v3.png and
study_v3_classes.png; prints the markdown tables.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = re.compile(r"^(?P<config>.+)-data(?P<data>[a-z0-9]+)-seed(?P<seed>\d+)$")
HELDOUT = ("heldout_gsm8k", "heldout_sharegpt")
LABELS = {"full": "full", "random": "random", "full-weightingdft": "full + dft",
          "full-weightingeaft": "full + eaft", "full-weightingasft": "full + asft",
          "sstoken": "sstoken (paper default)",
          "sstoken-normalizerank": "sstoken --normalize rank",
          "sstoken-attn_sink1": "sstoken --attn_sink 1",
          "sstoken-rho_ruleunlearned": "sstoken --rho_rule unlearned",
          "sstoken-historyepoch": "sstoken --history epoch"}


def collect(root: Path) -> dict:
    from sstoken.records import kept_by_class, read_scores

    runs = {}
    for d in sorted((root / "runs").iterdir()):
        m = RUN.match(d.name)
        if not m or not (d / "eval.json").exists():
            continue
        ev = json.loads((d / "eval.json").read_text())
        state = json.loads((d / "trainer_state.json").read_text())
        logs = [h for h in state["log_history"] if "loss" in h]
        run = {"config": m["config"], "data": m["data"], "seed": int(m["seed"]),
               **{t: ev["results"][t]["loss"] for t in HELDOUT},
               "train_loss_last": float(logs[-1]["loss"]),
               "train_seconds": json.loads((d / "sstoken_run.json").read_text())["seconds"],
               "attn_driven": [h.get("sel/attn_driven_frac") for h in logs],
               "rho": [h.get("sel/rho") for h in logs]}
        if (d / "selection.jsonl").exists():
            run["kept_by_class"] = kept_by_class(read_scores([d / "selection.jsonl"]))
        runs[d.name] = run
    base = root / "runs" / "base" / "eval.json"
    b = json.loads(base.read_text())["results"] if base.exists() else {}
    return {"runs": runs, "base": {t: b[t]["loss"] for t in HELDOUT if t in b}}


def summarize(data: dict) -> dict:
    from sstoken.stats import mean_se, paired_difference

    runs = data["runs"]
    out = {}
    for train_data in sorted({r["data"] for r in runs.values()}):
        by = {}
        for r in runs.values():
            if r["data"] == train_data:
                by.setdefault(r["config"], {})[r["seed"]] = r
        rows = {}
        for config, seeds in by.items():
            row = {"seeds": sorted(seeds)}
            for t in HELDOUT:
                row[t] = mean_se([s[t] for s in seeds.values()])
                for ref in ("full", "sstoken"):     # every run against full; variants against the paper's
                    if ref in by and config != ref and (ref == "full" or config.startswith("sstoken")):
                        row[f"{t} vs {ref}"] = paired_difference({k: s[t] for k, s in seeds.items()},
                                                                 {k: s[t] for k, s in by[ref].items()})
            row["train_loss_last"] = mean_se([s["train_loss_last"] for s in seeds.values()])
            row["train_seconds"] = sorted(s["train_seconds"] for s in seeds.values())[len(seeds) // 2]
            ad = [x for s in seeds.values() for x in s["attn_driven"][1:] if x is not None]
            row["attn_driven_frac"] = sum(ad) / len(ad) if ad else None
            rh = [x for s in seeds.values() for x in s["rho"] if x is not None]
            row["rho_mean"] = sum(rh) / len(rh) if rh else None
            kb = {}
            for s in seeds.values():
                for c, (k, n) in (s.get("kept_by_class") or {}).items():
                    kb.setdefault(c, [0, 0])
                    kb[c][0] += k
                    kb[c][1] += n
            row["kept_by_class"] = {c: (k / n if n else None, n) for c, (k, n) in kb.items()}
            rows[config] = row
        out[train_data] = rows
    return out


def fmt_diff(d) -> str:
    if d is None:
        return ""
    m, _, lo, hi = d
    bold = "**" if lo > 0 or hi < 0 else ""
    return f"{bold}{m:+.4f}{bold} [{lo:+.4f}, {hi:+.4f}]"


def markdown(summary: dict, base: dict) -> str:
    from sstoken.records import TOKEN_CLASSES

    lines = []
    for train_data, rows in summary.items():
        lines += [f"\n### Trained on {train_data}\n",
                  "| run (3 seeds) | held-out GSM8K | vs full | vs sstoken | held-out ShareGPT | vs full | vs sstoken | attn-driven | rho | train s (median) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        if base:
            lines.append(f"| base model | {base.get('heldout_gsm8k', 0):.4f} | | | "
                         f"{base.get('heldout_sharegpt', 0):.4f} | | | | | |")
        for config in LABELS:
            if config not in rows:
                continue
            r = rows[config]
            cells = [LABELS[config]]
            for t in HELDOUT:
                m, se = r[t]
                cells += [f"{m:.4f} ± {se:.4f}" if se is not None else f"{m:.4f}",
                          fmt_diff(r.get(f"{t} vs full")), fmt_diff(r.get(f"{t} vs sstoken"))]
            cells.append(f"{r['attn_driven_frac']:.2f}" if r["attn_driven_frac"] is not None else "")
            cells.append(f"{r['rho_mean']:.2f}" if r["rho_mean"] is not None else "")
            cells.append(f"{r['train_seconds']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Kept fraction by token class (trained on {train_data}; every training example's "
                      "last selection, 3 seeds pooled; the count of response tokens per seed in brackets)\n",
                  "| run | " + " | ".join(TOKEN_CLASSES) + " |",
                  "| --- |" + " --- |" * len(TOKEN_CLASSES)]
        for config in LABELS:
            if config not in rows or config.startswith("full"):
                continue
            kb = rows[config]["kept_by_class"]
            seeds = len(rows[config]["seeds"])
            lines.append(f"| {LABELS[config]} | " + " | ".join(
                f"{kb[c][0]:.2f} ({kb[c][1] // seeds})" if c in kb and kb[c][0] is not None else "-"
                for c in TOKEN_CLASSES) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    datas = list(summary)
    fig = Figure(figsize=(12, 3.6 * len(datas)))
    axes = fig.subplots(len(datas), 2, squeeze=False)
    for i, train_data in enumerate(datas):
        rows = summary[train_data]
        configs = [c for c in LABELS if c in rows and c != "full"]
        for j, t in enumerate(HELDOUT):
            ax = axes[i][j]
            ds = [rows[c].get(f"{t} vs full") for c in configs]
            ms = [d[0] if d else 0 for d in ds]
            err = [[d[0] - d[2] if d else 0 for d in ds], [d[3] - d[0] if d else 0 for d in ds]]
            ax.barh(range(len(configs)), ms, xerr=err, capsize=3,
                    color=["C1" if c.startswith("sstoken") else "C0" for c in configs])
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(range(len(configs)))
            ax.set_yticklabels([LABELS[c] for c in configs], fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"trained on {train_data}: {t} minus full (nats, 95% CI)",
                         fontsize=9)
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_classes(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    from sstoken.records import TOKEN_CLASSES

    datas = list(summary)
    fig = Figure(figsize=(12, 3.4 * len(datas)))
    axes = fig.subplots(len(datas), 1, squeeze=False)
    for i, train_data in enumerate(datas):
        rows = summary[train_data]
        configs = [c for c in LABELS if c in rows and not c.startswith("full")]
        ax = axes[i][0]
        w = 0.8 / len(configs)
        for k, c in enumerate(configs):
            kb = rows[c]["kept_by_class"]
            ax.bar([x + k * w for x in range(len(TOKEN_CLASSES))],
                   [kb.get(cl, (0, 0))[0] or 0 for cl in TOKEN_CLASSES], w, label=LABELS[c])
        ax.set_xticks([x + 0.4 - w / 2 for x in range(len(TOKEN_CLASSES))])
        ax.set_xticklabels(TOKEN_CLASSES, fontsize=8)
        ax.set_ylabel("kept fraction")
        ax.set_title(f"trained on {train_data}: kept fraction by token class (rho 0.6)", fontsize=9)
        ax.legend(fontsize=7, ncol=3)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(root: str) -> None:
    data = collect(Path(root))
    summary = summarize(data)
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_v3.json").write_text(json.dumps({"base": data["base"], "summary": summary,
                                                   "runs": data["runs"]}, indent=1))
    plot(summary, out / "study_v3.png")
    plot_classes(summary, out / "study_v3_classes.png")
    print(markdown(summary, data["base"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/study-v3")
