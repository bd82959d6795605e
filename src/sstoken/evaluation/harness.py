"""The lm-evaluation-harness runner: :func:`evaluate` writes ``eval.json`` and ``eval.md``.

``lm_eval`` (and torch, peft, transformers) are imported inside the functions, so this module
imports without them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ..io import atomic_write, log
from .heldout import heldout_loss
from .tables import finite_number, results_table
from .tasks import HELDOUT, PAPER_TASKS, PRESETS, write_offline_tasks


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mean_of_subtasks(results: dict, tag: str) -> dict:
    """A tag without an aggregate (e.g. ``tydiqa_goldp``): the unweighted mean of its subtasks,
    stderr combined as sqrt(sum se^2) / n (independent subtasks)."""
    subs = [v for k, v in results.items() if k.startswith(tag + "_")]
    out = {}
    for key in subs[0] if subs else []:
        if "," not in key or key.split(",")[0].endswith("_stderr"):
            continue
        vals = [finite_number(s.get(key)) for s in subs]
        if any(v is None for v in vals):
            continue
        out[key] = sum(vals) / len(vals)
        metric, filt = key.split(",", 1)
        ses = [finite_number(s.get(f"{metric}_stderr,{filt}")) for s in subs]
        if all(x is not None for x in ses):
            out[f"{metric}_stderr,{filt}"] = math.sqrt(sum(x * x for x in ses)) / len(ses)
    return out


def metrics_of(task_result: dict) -> dict[str, float | None]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` as ``{"acc": .., "acc_stderr": ..}``.

    Metrics under a filter other than ``none`` keep it (``exact_match,remove_whitespace`` ->
    ``exact_match`` when it is the only filter of that metric, else ``exact_match/filter``).
    """
    keys = [k for k in task_result if "," in k and not k.split(",")[0].endswith("_stderr")]
    count = {}
    for k in keys:
        count[k.split(",")[0]] = count.get(k.split(",")[0], 0) + 1
    out = {}
    for key in keys:
        metric, filt = key.split(",", 1)
        name = metric if count[metric] == 1 or filt == "none" else f"{metric}/{filt}"
        out[name] = finite_number(task_result[key])
        out[f"{name}_stderr"] = finite_number(task_result.get(f"{metric}_stderr,{filt}"))
    return out


def task_names(preset: str, tasks: list[str] | None, folder: Path) -> tuple[dict[str, str], Any]:
    """``({short: lm-eval name}, TaskManager)`` for a preset."""
    from lm_eval.tasks import TaskManager

    if preset == "offline":
        names = write_offline_tasks(folder, tasks)
        # our files only: indexing lm-eval's thousands of stock YAMLs takes ~13 s
        return names, TaskManager(include_path=str(folder), include_defaults=False)
    sel = tasks or list(PAPER_TASKS)
    unknown = sorted(set(sel) - set(PAPER_TASKS))
    if unknown:
        raise ValueError(f"unknown paper task(s) {unknown}; available: {list(PAPER_TASKS)}")
    return {t: PAPER_TASKS[t][1] for t in sel}, TaskManager()


_PAPER_HINT = ("The paper preset downloads its benchmarks from the Hugging Face hub (without it, "
               "use --preset offline). Stock tasks whose dataset still needs a loading script "
               "(EleutherAI/logiqa among them) fail with datasets>=4: run them with datasets<4, or "
               "leave them out with --tasks.")


def evaluate(*, model: str, adapter: str | None = None, preset: str = "offline",
             tasks: list[str] | None = None, limit: int | float | None = None, batch_size: int = 8,
             device: str = "cpu", num_fewshot: int | None = None,
             output_dir: str | os.PathLike = "outputs/eval", dtype: str = "auto",
             chat_template: bool = False, heldout: dict | list[dict] | None = None) -> dict:
    """Evaluate a model with lm-evaluation-harness and write ``eval.json`` and ``eval.md``.

    Args:
        model: a base or merged model folder, a hub name, or ``embedded:smollm2-135m-instruct``.
        adapter: a LoRA adapter folder trained on ``model``; merged into it before evaluation
            (its tokenizer is used when the folder has one).
        preset: ``offline`` (shipped benchmarks, no network) or ``paper`` (stock tasks, hub).
        tasks: a subset of the preset's short names (default: all); ``[]`` runs no lm-eval
            task, only ``heldout`` (which is then required).
        limit: documents per task (int), or a fraction of each task (float below 1).
        batch_size: lm-eval batch size. device: ``cpu``, ``cuda``, ``cuda:1`` ...
        num_fewshot: one few-shot count for every task (default: each task's own; in the paper
            preset TyDiQA is 1-shot and the others 0-shot).
        output_dir: where ``eval.json``, ``eval.md`` and (offline) ``tasks/`` go.
        dtype: ``auto`` (bf16 on a bf16 GPU, else fp32), ``float32``, ``bfloat16``, ``float16``.
        chat_template: wrap each prompt in the tokenizer's chat template (lm-eval's
            ``apply_chat_template``; few-shot examples as turns). Off by default, as in lm-eval;
            an instruct model often answers a raw generation prompt with end-of-turn at once.
        heldout: also score held-out SFT data (see :func:`heldout_loss`): ``{"data": source,
            "skip": records to skip, "samples": how many, "template": .., "max_seq_length": ..}``,
            or a list of them, each with a ``"name"``: task ``heldout_<name>`` for each.

    Returns the dict written to ``eval.json``: ``results = {task: {metric: value,
    metric_stderr: value or None}}`` (fractions, not %) plus the run's provenance.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if tasks is not None and not tasks and not heldout:
        raise ValueError("nothing to evaluate: no lm-eval task and no held-out data")
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"} if preset == "offline" else {}
    from ..progress import quiet

    if quiet():
        offline.setdefault("TQDM_DISABLE", "1")        # lm-eval's own bars, off in CI / logs
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with _env(**offline):
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
        except ImportError as e:
            raise ImportError(f"sstoken eval needs lm-evaluation-harness: pip install 'sstoken[eval]' ({e})") from e

        from ..modeling import load_model_with_adapter, load_tokenizer

        names, manager = task_names(preset, tasks, out / "tasks") if tasks != [] else ({}, None)
        log(f"loading {model}" + (f" + adapter {adapter}" if adapter else ""))
        m = load_model_with_adapter(model, adapter, dtype).to(device).eval()
        has_tok = adapter and (Path(adapter) / "tokenizer_config.json").exists()
        tok = load_tokenizer(adapter if has_tok else model)
        lm = HFLM(pretrained=m, tokenizer=tok, batch_size=batch_size, device=device) if names else None
        # one lm-eval call per few-shot setting (the paper runs TyDiQA 1-shot, the rest 0-shot)
        shots = {short: num_fewshot if num_fewshot is not None or preset != "paper"
                 else PAPER_TASKS[short][2] for short in names}
        raw: dict[str, dict] = {}
        n_samples: dict[str, Any] = {}
        for k in dict.fromkeys(shots.values()):
            group = [names[s] for s in names if shots[s] == k]
            log(f"lm-eval: {', '.join(group)} (limit {limit}, {k if k is not None else 'default'}-shot)")
            try:
                r = lm_eval.simple_evaluate(model=lm, tasks=group, num_fewshot=k, limit=limit,
                                            task_manager=manager, log_samples=False,
                                            apply_chat_template=chat_template)
            except (ConnectionError, RuntimeError) as e:
                if preset != "paper":
                    raise
                err = ConnectionError if isinstance(e, ConnectionError) else RuntimeError
                raise err(f"{e}\n{_PAPER_HINT}") from e
            raw.update(r["results"])
            n_samples.update(r.get("n-samples", {}))
    results = {short: metrics_of(raw.get(name) or mean_of_subtasks(raw, name))
               for short, name in names.items()}
    held = None
    if isinstance(heldout, dict):
        log(f"held-out loss on {heldout['data']}")
        results[HELDOUT], held = heldout_loss(m, tok, **heldout, batch_size=batch_size)
    elif heldout:                                   # several held-out sets, each named
        held = {}
        for h in heldout:
            h = dict(h)
            task = f"{HELDOUT}_{h.pop('name')}"
            log(f"held-out loss on {h['data']} ({task})")
            results[task], held[task] = heldout_loss(m, tok, **h, batch_size=batch_size)
    import peft
    import torch
    import transformers

    from ..embedded import resolve_model

    report = {"model": model, "resolved_model": resolve_model(model), "adapter": adapter,
              "preset": preset, "tasks": names, "limit": limit, "num_fewshot": shots,
              "chat_template": chat_template,
              "batch_size": batch_size, "device": device, "dtype": str(m.dtype).replace("torch.", ""),
              "seconds": round(time.time() - t0, 1),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "versions": {"lm_eval": getattr(lm_eval, "__version__", "?"), "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__},
              "n_samples": {short: n_samples.get(name) for short, name in names.items()},
              "heldout": held, "results": results}
    atomic_write(out / "eval.json", json.dumps(report, indent=2))
    atomic_write(out / "eval.md", results_table([report], [adapter or model]))
    return report
