"""``sstoken sweep``: a grid of training runs from one YAML, resumable, evaluated and compared.

Example (``configs/sweep-smollm2.yaml``)::

    output_dir: outputs/sweep
    base:                       # `sstoken train` options shared by every run
      model: embedded:smollm2-135m-instruct
      data: embedded:gsm8k
      max_samples: 256
    reference:                  # optional: trained once by `train-ref`, passed as --ref_model
      data: embedded:gsm8k
      skip_samples: 1000        # e.g. a held-out part of the pool as the high-quality subset
    grid:                       # each entry: lists are expanded as a product
      - {method: full}
      - {method: sstoken, gamma: [0.0, 0.5, 1.0], rho: [0.6]}
      - {method: rho1}
    seeds: [0, 1]
    eval:                       # lm-eval options, and optionally the held-out SFT loss
      preset: offline
      limit: 100
      include_base: true
      heldout: {data: embedded:gsm8k, skip_samples: 500, max_samples: 300}
      # or several sets by name (tasks heldout_gsm8k, heldout_chat):
      # heldout: {gsm8k: {data: embedded:gsm8k, ...}, chat: {data: embedded:sharegpt, ...}}

Every run lands in ``<output_dir>/runs/<name>/``; a run whose ``sstoken_run.json`` and
``eval.json`` exist is skipped, so an interrupted sweep continues where it stopped. The base
model's per-token losses are scored once (``sstoken score``) and found by every sstoken run
through the cache; the reference model's once and found by every rho1/tokencleaning run.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from .embedded import EMBEDDED_MODEL
from .errors import UsageError
from .io import atomic_write, log

NEEDS_REF = ("rho1", "tokencleaning")
# options that always appear in a run's name when a grid entry sets them
NAMED = ("gamma", "rho", "attn_layer", "weighting", "normalize", "attn_sink", "rho_rule", "history",
         "data")
SPEC_KEYS = ("output_dir", "base", "reference", "grid", "seeds", "eval")
# sweep-only eval keys; every other eval key is an option of `sstoken eval`
EVAL_SWEEP_KEYS = ("include_base", "benchmark_seeds", "heldout")
HELDOUT_KEYS = ("data", "skip_samples", "max_samples")


def _fmt(v: Any) -> str:
    return str(v).replace("/", "_").replace(" ", "").replace("embedded:", "")


def expand(spec: dict) -> list[dict]:
    """The runs of a sweep spec: ``[{"name", "options"}]``, seeds outermost.

    Seed 0 of every grid point comes first, so a sweep cut short still holds one complete
    replicate of the whole grid rather than every seed of its first methods only.
    """
    grid = spec.get("grid") or [{"method": "full"}]
    seeds = spec.get("seeds") or [0]
    points = []
    for entry in grid:
        if not isinstance(entry, dict) or "method" not in entry:
            raise UsageError(f"each grid entry needs a method, got {entry!r}")
        keys = list(entry)
        values = [v if isinstance(v, list) else [v] for v in entry.values()]
        for combo in itertools.product(*values):
            opts = dict(zip(keys, combo))
            varying = [k for k, v in zip(keys, values)
                       if len(v) > 1 or k in NAMED]
            points.append((opts["method"] + "".join(f"-{k}{_fmt(opts[k])}" for k in varying
                                                    if k != "method"), opts))
    runs, seen = [], set()
    for seed in seeds:
        for base_name, opts in points:
            name = f"{base_name}-seed{seed}"
            if name in seen:
                raise UsageError(f"two grid entries give the run name {name}")
            seen.add(name)
            runs.append({"name": name, "options": {**opts, "seed": seed}})
    return runs


def _flags(options: dict) -> list[str]:
    out = []
    for k, v in options.items():
        out += [f"--{k}", str(v)]
    return out


def _train_options(options: dict) -> tuple:
    """The train dataclasses of one run, parsed exactly as `sstoken train` flags would be."""
    from .args import parse

    return parse("train", _flags(options))


def check_spec(spec: Any, where: str) -> dict:
    """Check a sweep spec against the options of `sstoken train` and `sstoken eval`, and every
    run it expands to; raise one :class:`UsageError` listing every problem (an unknown key is
    named with where it is)."""
    from .args import TRAIN, EvalArguments, ScoreArguments, option_names

    if not isinstance(spec, dict):
        raise UsageError(f"{where}: expected a mapping of {', '.join(SPEC_KEYS)}")
    problems = [f"{where}: unknown key {k!r} (expected {', '.join(SPEC_KEYS)})"
                for k in spec if k not in SPEC_KEYS]
    train_keys = option_names(TRAIN)
    for section in ("base", "reference"):
        part = spec.get(section) or {}
        if not isinstance(part, dict):
            problems.append(f"{where}: {section} must be a mapping of `sstoken train` options")
            continue
        problems += [f"{where}: {section}.{k} is not an option of `sstoken train`"
                     for k in part if k not in train_keys]
    for i, entry in enumerate(spec.get("grid") or []):
        if isinstance(entry, dict):
            problems += [f"{where}: grid[{i}].{k} is not an option of `sstoken train`"
                         for k in entry if k not in train_keys]
    ev = spec.get("eval") or {}
    if not isinstance(ev, dict):
        problems.append(f"{where}: eval must be a mapping of `sstoken eval` options")
        ev = {}
    eval_keys = option_names((EvalArguments, ScoreArguments)) | set(EVAL_SWEEP_KEYS)
    problems += [f"{where}: eval.{k} is not an option of `sstoken eval` (or one of "
                 f"{', '.join(EVAL_SWEEP_KEYS)})" for k in ev if k not in eval_keys]
    held = ev.get("heldout")
    for name, h in _heldout_sets(held).items():
        if not isinstance(h, dict) or "data" not in h or set(h) - set(HELDOUT_KEYS):
            at = "eval.heldout" + (f".{name}" if name else "")
            problems.append(f"{where}: {at} takes {', '.join(HELDOUT_KEYS)} (data required), or "
                            f"several such sets by name; got {h!r}")
    if ev.get("benchmark_seeds") is not None and held is None:
        problems.append(f"{where}: eval.benchmark_seeds needs eval.heldout (the other seeds get only that)")
    if problems:
        raise UsageError(problems)
    base = dict(spec.get("base") or {})
    for r in expand(spec):
        try:
            _train_options({**base, **r["options"], "ref_model": "x", "output_dir": "x"})
        except UsageError as e:
            problems += [f"{where}: run {r['name']}: {p}" for p in e.problems]
    if problems:
        raise UsageError(problems)
    return spec


def run_sweep(spec_path: str, dry_run: bool = False, only: list[str] | None = None,
              no_eval: bool = False) -> dict:
    """Train (and evaluate) every run of the sweep at ``spec_path``; finished runs are skipped."""
    from .runs import score, train

    try:
        spec = yaml.safe_load(Path(spec_path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{spec_path}: not valid YAML ({e})".replace("\n", " ")) from None
    spec = check_spec(spec, spec_path)
    root = Path(spec.get("output_dir", "outputs/sweep"))
    base = dict(spec.get("base") or {})
    runs = expand(spec)
    if only:
        runs = [r for r in runs if any(o in r["name"] for o in only)]
    log(f"sweep {spec_path}: {len(runs)} runs in {root}")
    if dry_run:
        for r in runs:
            print(r["name"], _flags(r["options"]))
        return {"runs": runs}
    root.mkdir(parents=True, exist_ok=True)
    ev = {} if no_eval else (spec.get("eval") or {})
    ref_dir = None
    if any(r["options"]["method"] in NEEDS_REF and "ref_model" not in r["options"] for r in runs):
        ref_dir = _reference(spec, base, root)
    # score the base model once per training data: every sstoken run finds its losses in the cache
    data_keys = ("data", "max_samples", "skip_samples")
    to_score = {tuple((k, r["options"].get(k, base.get(k))) for k in data_keys)
                for r in runs if r["options"]["method"] == "sstoken"}
    for key in sorted(to_score, key=str):
        m, _, d, _, _ = _train_options({**base, **{k: v for k, v in key if v is not None},
                                        "output_dir": str(root / "score")})
        score(m, d)
    done = []
    for r in runs:
        out = root / "runs" / r["name"]
        finished = (out / "sstoken_run.json").exists() and (not ev or (out / "eval.json").exists())
        if finished:
            log(f"{r['name']}: done already, skipped")
            done.append(out)
            continue
        opts = {**base, **r["options"], "output_dir": str(out)}
        if opts["method"] in NEEDS_REF and "ref_model" not in opts:
            opts["ref_model"] = str(ref_dir)
        if not (out / "sstoken_run.json").exists():
            log(f"{r['name']}: training")
            train(*_train_options({**opts, "overwrite_output_dir": True}))   # an unfinished try
        if ev:
            bench_seeds = ev.get("benchmark_seeds")
            held_only = bench_seeds is not None and r["options"]["seed"] not in bench_seeds
            _evaluate(opts.get("model", EMBEDDED_MODEL), str(out), out,
                      {**ev, "tasks": []} if held_only else ev, base)
        done.append(out)
    if ev and ev.get("include_base", True):
        b = root / "runs" / "base"
        if not (b / "eval.json").exists():
            _evaluate(base.get("model", EMBEDDED_MODEL), None, b, ev, base)
        done.insert(0, b)
    result = {"runs": [str(d) for d in done]}
    if ev:
        from .evaluation import compare

        result["compare"] = compare([str(d) for d in done], str(root / "compare"))
        result["ablation"] = _ablation_plots([d for d in done if (d / "sstoken_run.json").exists()],
                                             root / "compare")
    result["report"] = _report([d for d in done if (d / "selection.jsonl").exists()], root,
                               (spec.get("seeds") or [0])[0])
    atomic_write(root / "sweep.json", json.dumps(result, indent=2, default=str))
    return result


def _ablation_plots(runs: list[Path], out: Path) -> dict[str, str]:
    """sstoken runs' benchmark average and held-out loss against gamma and rho (when the sweep
    varies them); seeds at the same point are averaged, with their stderr as the error bar."""
    from .evaluation import cells_of, is_loss, load_eval, primary, with_average
    from .report import plot_ablation

    rows = []
    for d in runs:
        s = json.loads((d / "sstoken_run.json").read_text())
        if s["method"] != "sstoken" or not (d / "eval.json").exists():
            continue
        (cells,), _ = with_average([cells_of(load_eval(d))])       # benchmarks in %, loss in nats
        row = {"method": "sstoken", "gamma": s["gamma"], "rho": s["rho"], "average": cells["average"][0]}
        for t in filter(is_loss, cells):
            row[f"{t} {primary(t)}"] = cells[t][0]
        rows.append(row)
    plots = {}
    for x in ("gamma", "rho"):
        if len({r[x] for r in rows}) > 1:
            for y in ["average"] + sorted({k for r in rows for k in r if k.endswith(" loss")}):
                name = f"ablation_{x}" + ("" if y == "average" else "_" + y.split()[0])
                p = plot_ablation(rows, x, y, out / f"{name}.png")
                if p:
                    plots[name.removeprefix("ablation_")] = p
    return plots


def _report(runs: list[Path], root: Path, first_seed: int = 0) -> str | None:
    """One page with every run's saved selections side by side, plus training curves (of the
    first seed only: a curve per run of every seed is unreadable)."""
    from .report import plot_training, read_scores, write_html

    if not runs:
        return None
    records = []
    for d in runs:
        for r in read_scores([d / "selection.jsonl"]):
            records.append({**r, "method": d.name})
    curves = [d for d in runs if (d / "trainer_state.json").exists() and d.name.endswith(f"-seed{first_seed}")]
    plots = plot_training({d.name: str(d) for d in curves}, root / "compare")
    return str(write_html(records, root / "report.html", f"sstoken sweep: {root.name}", plots))


def _reference(spec: dict, base: dict, root: Path) -> Path:
    """Train the reference model once (``train-ref``), merged, under ``<root>/reference``."""
    from .runs import merge, train

    out = root / "reference"
    merged = out / "merged"
    if (merged / "config.json").exists():
        return merged
    ref = dict(spec.get("reference") or {})
    if not ref:
        raise UsageError("rho1/tokencleaning runs need `reference:` (data for train-ref) or a ref_model")
    log("training the reference model")
    model, finetune, *rest = _train_options({**base, **ref, "method": "full", "output_dir": str(out),
                                             "overwrite_output_dir": True})
    train(model, finetune, *rest)
    if finetune.finetune == "lora":
        merge(model, str(out), str(merged))
    else:
        merged = out
    return merged


def _heldout_sets(held) -> dict:
    """``eval.heldout`` as ``{name: set}``: one set (a mapping with ``data``) is ``{"": set}``
    (task ``heldout``); a mapping of names to sets gives task ``heldout_<name>`` for each."""
    if held is None:
        return {}
    if isinstance(held, dict) and held and "data" not in held and \
            all(isinstance(v, dict) for v in held.values()):
        return {str(k): v for k, v in held.items()}
    return {"": held}


def _evaluate(model: str, adapter: str | None, out: Path, ev: dict, base: dict) -> None:
    """Evaluate one run (keys as checked by :func:`check_spec`)."""
    from .args import TemplateArguments
    from .evaluation import evaluate

    heldout = []
    for name, h in _heldout_sets(ev.get("heldout")).items():
        heldout.append({"data": h["data"], "skip": int(h.get("skip_samples", 0)),
                        "samples": h.get("max_samples"),
                        "template": base.get("template", TemplateArguments.template),
                        "max_seq_length": int(base.get("max_seq_length", TemplateArguments.max_seq_length)),
                        **({"name": name} if name else {})})
    heldout = heldout[0] if len(heldout) == 1 and "name" not in heldout[0] else heldout or None
    out.mkdir(parents=True, exist_ok=True)
    log(f"evaluating {adapter or model} ({ev.get('preset', 'offline')}, limit {ev.get('limit')}"
        + (", held-out loss only)" if ev.get("tasks") == [] else ")"))
    evaluate(model=model, adapter=adapter, preset=ev.get("preset", "offline"), tasks=ev.get("tasks"),
             limit=ev.get("limit"), batch_size=ev.get("batch_size", 8), device=ev.get("device", "cpu"),
             num_fewshot=ev.get("num_fewshot"), output_dir=str(out), heldout=heldout,
             chat_template=bool(ev.get("apply_chat_template", False)))
