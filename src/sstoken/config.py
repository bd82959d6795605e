"""Run configuration: dataclasses with one docstring per field, parsed by ``HfArgumentParser``.

``sstoken train --config run.yaml --rho 0.6`` reads the YAML first and lets command-line flags
override it. Training options (learning rate, batch size, epochs, logging, ``report_to``...)
are transformers' own ``TrainingArguments``: every flag users know from the Trainer works.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .embedded import EMBEDDED_DATA, EMBEDDED_MODEL
from .progress import quiet

METHODS = ("full", "random", "rho1", "tokencleaning", "sstoken")


def _h(text: str, **kw) -> Any:
    """A dataclass field whose help text is ``text`` (shown by ``--help``)."""
    default = kw.pop("default", None)
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelArguments:
    """Which model to fine-tune and how to load it."""

    model: str = _h("Base model: a local folder, a hub name, or the embedded SmolLM2-135M-Instruct "
                    f"({EMBEDDED_MODEL}).", default=EMBEDDED_MODEL)
    dtype: str = _h("Weights dtype: float32, bfloat16 or float16 (auto = bfloat16 on a GPU that "
                    "supports it, else float32).", default="auto")
    attn_implementation: str = _h("Attention kernel: sdpa, flash_attention_2 or eager. The "
                                  "attention score wraps it, it does not replace it.", default="sdpa")
    finetune: str = _h("lora (peft adapter, the paper's setup) or full (all weights).", default="lora")
    lora_r: int = _h("LoRA rank.", default=64)
    lora_alpha: int = _h("LoRA alpha (scale = alpha / r).", default=16)
    lora_dropout: float = _h("LoRA dropout.", default=0.1)
    lora_target_modules: str = _h("Comma-separated module names LoRA adapts.",
                                  default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    loss_chunk_size: int = _h("Rows projected to the vocabulary at once in the chunked per-token "
                              "loss (memory O(chunk x vocab) instead of O(tokens x vocab)).",
                              default=1024)


@dataclass
class DataArguments:
    """Which data to train on and how to turn it into tokens."""

    data: str = _h("Training data: a .json/.jsonl file, a datasets folder, a hub dataset name, or "
                   f"the embedded GSM8K ({EMBEDDED_DATA}). Records: messages, prompt/completion or "
                   "instruction/input/output.", default=EMBEDDED_DATA)
    template: str = _h("tulu (the paper's <|user|>/<|assistant|> template, default) or chat (the "
                       "tokenizer's own chat template).", default="tulu")
    max_seq_length: int = _h("Truncate samples to this many tokens; samples left with no "
                             "response token are dropped and counted.", default=2048)
    skip_invalid: bool = _h("Skip and count invalid records instead of stopping at the first.",
                            default=False)
    max_samples: int | None = _h("Use only the first N valid samples.", default=None)
    skip_samples: int = _h("Skip the first N records (e.g. to hold out part of a pool).", default=0)
    split: str = _h("Split to read from a datasets folder or hub dataset.", default="train")


@dataclass
class SelectionArguments:
    """Token selection (DESIGN.md section 2)."""

    method: str = _h(f"One of {', '.join(METHODS)}.", default="full")
    rho: float = _h("Selection ratio: the fraction of response tokens trained on (0, 1].",
                    default=0.6)
    gamma: float = _h("ssToken balance (Eq. 9): gamma * minmax(REL) + (1 - gamma) * AttnScore. "
                      "1 = REL only, 0 = attention only.", default=0.5)
    attn_layer: str = _h("Layer of the attention score: an index (negative from the end; -1 = "
                         "last, as in the official code) or shallow/middle/deep.", default="-1")
    history: str = _h("ssToken history model: base (the model before SFT; with LoRA the same "
                      "network with the adapter disabled) or ema (an EMA of the trained weights; "
                      "with LoRA an EMA of the adapter factors).", default="base")
    ema_alpha: float = _h("EMA decay for history=ema (Eq. 4): his <- a * his + (1 - a) * theta.",
                          default=0.99)
    history_losses: str = _h("Where base-model losses come from: auto (the cache from `sstoken "
                             "score` if one matches, else computed online), online, or a cache "
                             "folder (must match, else an error).", default="auto")
    rel_warmup: float = _h("Fraction of training steps that use attention only (gamma treated "
                           "as 0) while REL is still noise; the official code uses 0.2 "
                           "(10k of 50k samples).", default=0.0)
    ref_model: str | None = _h("Reference model for rho1 and tokencleaning (e.g. trained by "
                               "`sstoken train-ref`).", default=None)
    scope: str = _h("Where the top-rho is taken: sample (default for rho1 and sstoken), batch "
                    "(RHO-1 paper) or pool (TokenCleaning fixed-model, over the whole data).",
                    default="auto")
    tc_mode: str = _h("tokencleaning: fixed (base minus reference loss, offline) or "
                      "self_evolving (contiguous partitions, previous round as reference).",
                      default="fixed")
    tc_partitions: int = _h("tokencleaning self_evolving: number of partitions/rounds.", default=5)
    save_scores: int = _h("Save per-token scores and keep masks of the first N examples "
                          "(selection.jsonl in the output folder) for `sstoken show`.", default=16)
    cache_dir: str | None = _h("Root of the per-token loss cache (default $SSTOKEN_CACHE or "
                               "~/.cache/sstoken).", default=None)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.history not in ("base", "ema"):
            raise ValueError(f"history must be base or ema, got {self.history!r}")
        if not 0 <= self.rel_warmup < 1:
            raise ValueError(f"rel_warmup must be in [0, 1), got {self.rel_warmup}")
        if self.scope == "auto":
            self.scope = "pool" if self.method == "tokencleaning" else "sample"
        if self.scope not in ("sample", "batch", "pool"):
            raise ValueError(f"scope must be sample, batch or pool, got {self.scope!r}")
        if self.tc_mode not in ("fixed", "self_evolving"):
            raise ValueError(f"tc_mode must be fixed or self_evolving, got {self.tc_mode!r}")
        if self.method in ("rho1",) and not self.ref_model:
            raise ValueError("method rho1 needs --ref_model")
        if self.method == "tokencleaning" and self.tc_mode == "fixed" and not self.ref_model:
            raise ValueError("tokencleaning (fixed) needs --ref_model")


TRAIN_DEFAULTS = {
    # The paper's setup (DESIGN.md section 1) where transformers' defaults differ.
    "learning_rate": 1e-4,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.03,  # a fraction of the steps (transformers 5)
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "remove_unused_columns": False,
}


def parser():
    from transformers import HfArgumentParser, TrainingArguments

    p = HfArgumentParser((ModelArguments, DataArguments, SelectionArguments, TrainingArguments),
                         prog="sstoken train",
                         description="Fine-tune a causal LM with token selection.")
    p.add_argument("--config", default=None,
                   help="YAML file of options (any flag name without dashes); flags override it.")
    return p


def parse_train_args(argv: list[str] | None = None):
    """Parse ``--config file.yaml`` plus flags into the four dataclasses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    cfg_path = None
    if "--config" in argv:
        i = argv.index("--config")
        cfg_path = argv[i + 1]
        del argv[i:i + 2]
    defaults = dict(TRAIN_DEFAULTS, disable_tqdm=quiet())
    if cfg_path:
        loaded = yaml.safe_load(Path(cfg_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{cfg_path}: expected a mapping of option names to values")
        known = {a.dest for a in p._actions}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{cfg_path}: unknown option(s) {unknown}")
        defaults.update(loaded)
    p.set_defaults(**defaults)
    if "--output_dir" not in argv and "--output-dir" not in argv and "output_dir" not in defaults:
        argv += ["--output_dir", "outputs/run"]
    model_args, data_args, sel_args, train_args, _ = p.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, sel_args, train_args


def to_dict(*objs) -> dict[str, Any]:
    out = {}
    for o in objs:
        out.update({f.name: getattr(o, f.name) for f in fields(o)})
    return out
