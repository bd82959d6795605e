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
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from ..errors import UsageError
from .commands import (DEMO_PRESET, DEMO_TRAINING, CompareArguments, DemoArguments, EvalArguments,
                       MergeArguments, ScoreArguments, ShowArguments, SweepArguments)
from .checks import ATTN_IMPLEMENTATIONS, DTYPES, FINETUNE, TEMPLATES, Checks
from .train import (AdapterArguments, DataArguments, FinetuneArguments, ModelArguments,
                    SelectionArguments, TemplateArguments, TrainArguments)

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


# options whose default is None, so that null in a config file means that default
NULLABLE = {f.name for t in {t for _, ts in COMMANDS.values() for t in ts} for f in fields(t)
            if f.default is None}


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
    nulls = [k for k, v in loaded.items() if v is None and k not in NULLABLE]
    if nulls:
        raise UsageError([f"--config {path}: option {k} has no value (null)" for k in nulls])
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
    argv = [x for a in argv for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if argv.count("--config") > 1:
        raise UsageError(["--config given twice: put every option in one file"])
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
    if getattr(ns, "config", None):                    # an abbreviation argparse accepted (--conf)
        raise UsageError([f"write --config in full (got an abbreviation for {ns.config})"])
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


__all__ = ["ModelArguments", "AdapterArguments", "FinetuneArguments", "TemplateArguments",
           "DataArguments", "SelectionArguments", "TrainArguments", "ScoreArguments",
           "MergeArguments", "DemoArguments", "EvalArguments", "CompareArguments", "ShowArguments",
           "SweepArguments", "DEMO_PRESET", "DEMO_TRAINING", "TRAIN", "COMMANDS", "Checks",
           "TEMPLATES", "DTYPES", "FINETUNE", "ATTN_IMPLEMENTATIONS", "parse", "build",
           "option_names", "train_args_from", "to_dict"]
