"""Options of training and scoring: the model, LoRA, the data, the selection method, and
transformers' ``TrainingArguments`` with the paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import TrainingArguments

from ..embedded import EMBEDDED_DATA, EMBEDDED_MODEL
from ..errors import UsageError
from ..progress import quiet
from .checks import ATTN_IMPLEMENTATIONS, DTYPES, FINETUNE, TEMPLATES, Checks, _h


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
    """Token selection and weighting: which tokens count (``--method``) and how much
    (``--weighting``) (``docs/design.md``, "Methods", "Weighting")."""

    method: str = _h("full, random, rho1, tokencleaning or sstoken (see README, The methods).", "sstoken")
    rho: float = _h("Selection ratio: the fraction of response tokens trained on (0, 1].", 0.6)
    gamma: float = _h("ssToken balance (Eq. 9): gamma * minmax(REL) + (1 - gamma) * AttnScore. "
                      "1 = REL only, 0 = attention only.", 0.5)
    normalize: str = _h("ssToken: how both signals are put on one scale before Eq. 9. minmax "
                        "(the paper: REL min-max per sample, the attention score as is) or rank "
                        "(both to their per-sample percentile, so gamma sets a real mix; "
                        "docs/design.md, Beyond the paper).", "minmax")
    attn_sink: int = _h("ssToken: leave the first N tokens of each sequence (the attention sink) "
                        "out of the attention score and renormalize the rest; 0 = the paper.", 0)
    rho_rule: str = _h("How many tokens each step keeps: fixed (rho, the paper) or unlearned "
                       "(the share of the previous step's response tokens the model still gives "
                       "a probability below --learned_prob, at least 0.1; rho for the first "
                       "step).", "fixed")
    learned_prob: float = _h("rho_rule unlearned: a token counts as learned once the model "
                             "gives it at least this probability.", 0.5)
    attn_layer: str = _h("Layer of the attention score: an index (negative from the end; -1 = "
                         "last, as in the official code) or shallow/middle/deep.", "-1")
    history: str = _h("ssToken history model: base (the model before SFT; with LoRA the same "
                      "network with the adapter disabled), ema (an EMA of the trained weights; "
                      "with LoRA an EMA of the adapter factors) or epoch (the model at the start "
                      "of the current epoch; in epoch 1 the base model).", "base")
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
    weighting: str = _h("How much each kept token counts: none (1, plain SFT), dft (its "
                        "probability, Wu et al. 2025), eaft (its normalized top-k entropy, "
                        "arXiv:2601.02151) or asft (dft plus a KL anchor to the base model, "
                        "arXiv:2509.23753). Composes with any --method.", "none")
    dft_min_weight: float = _h("dft, asft: floor on the weight (the authors' advice for long data).", 0.0)
    asft_alpha: float = _h("asft: weight of the token-wise KL to the frozen base model.", 0.1)
    eaft_alpha: float = _h("eaft: exponent of the normalized entropy.", 1.0)
    eaft_k: int = _h("eaft: the entropy is taken over the top-k logits.", 20)
    save_scores: int = _h("Save per-token scores and keep masks of the first N examples "
                          "(selection.jsonl in the output folder) for `sstoken show`.", 16)

    def __post_init__(self):
        from ..methods import METHODS

        c = Checks()
        c.choice("method", self.method, list(METHODS))
        c(0 < self.rho <= 1, f"--rho must be in (0, 1], got {self.rho}")
        c(0 <= self.gamma <= 1, f"--gamma must be in [0, 1], got {self.gamma}")
        c.choice("history", self.history, ("base", "ema", "epoch"))
        c.choice("normalize", self.normalize, ("minmax", "rank"))
        c(self.attn_sink >= 0, f"--attn_sink must be >= 0, got {self.attn_sink}")
        c.choice("rho_rule", self.rho_rule, ("fixed", "unlearned"))
        c(0 < self.learned_prob < 1, f"--learned_prob must be in (0, 1), got {self.learned_prob}")
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
            from ..attention import resolve_layer

            resolve_layer(self.attn_layer, 10 ** 6)             # the form; the range needs the model
        except ValueError as e:
            c(False, f"--{e}")
        if self.method in METHODS:
            c.problems += METHODS[self.method].check(self)
            c(self.rho_rule == "fixed" or METHODS[self.method].adaptive_rho,
              f"--rho_rule {self.rho_rule}: --method {self.method} has no per-step rho to adapt "
              "(use random, rho1 or sstoken)")
        for name, default in (("normalize", "minmax"), ("attn_sink", 0)):
            c(self.method == "sstoken" or getattr(self, name) == default,
              f"--{name} applies to --method sstoken only (got --method {self.method})")
        from ..weightings import WEIGHTINGS

        c.choice("weighting", self.weighting, list(WEIGHTINGS))
        if self.weighting in WEIGHTINGS:
            c.problems += WEIGHTINGS[self.weighting].check(self)
        c.done()
        if self.scope == "auto" and self.method in METHODS:
            self.scope = METHODS[self.method].default_scope


@dataclass
class TrainArguments(TrainingArguments):
    """transformers' ``TrainingArguments`` (every Trainer flag works) with the paper's defaults
    where they differ from transformers', as field defaults (as TRL's ``SFTConfig`` does), so
    the command line, config files and the Python API agree.

    Changed defaults: ``output_dir`` outputs/run (instead of none); ``learning_rate`` 1e-4
    (instead of 5e-5); ``num_train_epochs`` 1 (instead of 3); ``warmup_steps`` 0.03, a
    fraction of the steps (instead of 0); ``logging_steps`` 1 (instead of 500);
    ``save_strategy`` no (instead of steps); ``remove_unused_columns`` False (the collator
    needs every column); ``disable_tqdm`` on in CI and non-terminal logs.
    """

    output_dir: str | None = _h("Where the adapter (or model), logs and selection.jsonl go.", "outputs/run")
    learning_rate: float = _h("Peak learning rate (the paper: 1e-4).", 1e-4)
    num_train_epochs: float = _h("Epochs (the paper: 1).", 1.0)
    warmup_steps: float = _h("Warm-up: steps, or a fraction of the steps below 1 (the paper: 0.03).", 0.03)
    logging_steps: float = _h("Log (and reduce the selection statistics) every N steps.", 1)
    save_strategy: str = _h("Checkpoints: no (default), steps or epoch.", "no")
    remove_unused_columns: bool = _h("Must stay False: sstoken's collator needs every column.", False)
    overwrite_output_dir: bool = _h("Train into an --output_dir that holds an earlier run: its "
                                    "checkpoints and outputs are deleted first (otherwise an "
                                    "error: resume it or choose another folder).", False)
    disable_tqdm: bool | None = _h("No progress bars (default: off in CI and in non-terminal logs).",
                                   None)

    def __post_init__(self):
        if self.disable_tqdm is None:
            self.disable_tqdm = quiet()
        problems = []
        if self.remove_unused_columns:
            problems.append("--remove_unused_columns must stay false: sstoken's batches carry "
                            "per-token fields the model's forward does not take")
        if str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no":
            problems.append("--eval_strategy: `sstoken train` has no evaluation set; evaluate "
                            "afterwards with `sstoken eval` (the held-out loss with --heldout)")
        try:
            super().__post_init__()
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise UsageError(problems)
