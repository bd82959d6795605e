"""sstoken inside TRL: token selection for ``SFTTrainer`` users.

Change two names in an existing TRL script and add the selection options::

    from sstoken.integrations.trl import SSTokenSFTConfig, SSTokenSFTTrainer

    config = SSTokenSFTConfig(output_dir="out", method="sstoken", rho=0.6, gamma=0.5, ...)
    trainer = SSTokenSFTTrainer(model=model, args=config, train_dataset=dataset)
    trainer.train()

* :class:`SSTokenSFTConfig` is TRL's ``SFTConfig`` plus sstoken's selection options
  (:class:`sstoken.args.SelectionArguments`: ``method``, ``rho``, ``gamma``, ``attn_layer``,
  ``history``, ``ref_model`` ...) and ``loss_chunk_size``, with the same defaults and checks
  as the ``sstoken`` command line. It parses with ``TrlParser`` / ``HfArgumentParser`` like any
  TRL config.
* :class:`SSTokenSFTTrainer` is ``SFTTrainer`` with sstoken's loss
  (:class:`sstoken.trainer.SelectionMixin`): the same code as ``sstoken train``, on the batches
  TRL builds. TRL prepares the dataset as usual (conversational ``messages`` or
  prompt-completion, its chat template, ``assistant_only_loss`` / ``completion_only_loss``,
  truncation); its labels define R, the tokens that may be trained on, and P, the prompt the
  attention score looks at, is every other token. Methods that need per-token values of the
  whole data (rho1's reference losses, TokenCleaning's pool selection, a cached history) score
  the prepared dataset once before training, through sstoken's cache.

Packing and ``padding_free`` put several samples in one row; the attention score, the prompt
set and per-sample top-k would then cross sample boundaries, so they are refused (the check
is in the config). TokenCleaning's self-evolving rounds are refused too (use ``sstoken train``).
``random`` seeds each sample by its position in TRL's prepared dataset, as ``sstoken train``
seeds by its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..args import DataArguments, ModelArguments, SelectionArguments
from ..data import Example
from ..errors import UsageError
from ..scoring import IGNORE_INDEX
from ..trainer import SelectionMixin

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as e:                                    # pragma: no cover - the extra
    raise ImportError(f"sstoken.integrations.trl needs TRL: pip install 'sstoken[trl]' ({e})") from e

PER_TOKEN_FIELDS = ("history_loss", "ref_loss", "keep")
INDEX = "sstoken_index"
_CHUNK = {f.name: f for f in fields(ModelArguments)}["loss_chunk_size"]


@dataclass
class SSTokenSFTConfig(SFTConfig, SelectionArguments):
    """TRL's ``SFTConfig`` with sstoken's selection options (see
    :class:`sstoken.args.SelectionArguments`) and ``loss_chunk_size``. Every problem with the
    selection options, and packing / padding-free training, is reported at once as a
    :class:`sstoken.errors.UsageError`."""

    loss_chunk_size: int = field(default=_CHUNK.default, metadata=_CHUNK.metadata)

    def __post_init__(self):
        SFTConfig.__post_init__(self)
        problems = []
        try:
            SelectionArguments.__post_init__(self)
        except UsageError as e:
            problems += e.problems
        if self.packing or self.padding_free:
            problems.append("packing / padding_free put several samples in one row; sstoken's "
                            "attention score, prompt set and per-sample top-k would cross sample "
                            "boundaries: set packing=False and padding_free=False")
        if self.method == "tokencleaning" and self.tc_mode == "self_evolving":
            problems.append("tokencleaning self_evolving retrains over partitions: use `sstoken train`")
        if self.loss_chunk_size < 0:
            problems.append(f"loss_chunk_size must be >= 0, got {self.loss_chunk_size}")
        if problems:
            raise UsageError(problems)


class _SelectionCollator:
    """TRL's collator, plus each example's index and the per-token values a method attached,
    right-padded with 0 to the batch's length (TRL pads on the right too)."""

    def __init__(self, collator, per_token: tuple[str, ...]):
        self.collator, self.per_token = collator, per_token

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.collator(examples)
        if INDEX not in examples[0]:               # an evaluation set: the plain loss needs none
            return out
        L = out["input_ids"].shape[1]
        out["index"] = torch.tensor([e[INDEX] for e in examples])
        for name in self.per_token:
            t = torch.zeros(len(examples), L, dtype=torch.float32)
            for b, e in enumerate(examples):
                t[b, :len(e[name])] = torch.tensor(e[name], dtype=torch.float32)
            out[name] = t
        return out


def _model_name(model) -> str:
    """The base model's name or folder (for scoring it and keying the cache)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(m, "name_or_path", None) or m.config._name_or_path


class SSTokenSFTTrainer(SelectionMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training on the tokens an sstoken method selects.

    Args: as ``SFTTrainer``; ``args`` must be an :class:`SSTokenSFTConfig`. After TRL has
    prepared ``train_dataset``, the method's per-dataset work runs (e.g. rho1's reference
    losses), then training uses the same loss as ``sstoken train``: normalized by the kept
    tokens of the whole optimizer step, over gradient accumulation and processes.
    """

    def __init__(self, model=None, args: SSTokenSFTConfig | None = None, *pos, **kwargs):
        if not isinstance(args, SSTokenSFTConfig):
            raise UsageError("SSTokenSFTTrainer needs args=SSTokenSFTConfig(...) (TRL's SFTConfig "
                             "with sstoken's selection options)")
        super().__init__(model, args, *pos, **kwargs)
        ds = self.train_dataset
        if ds is None:
            raise UsageError("SSTokenSFTTrainer needs a train_dataset")
        examples = [Example(str(i), list(r["input_ids"]), list(r["labels"])) for i, r in enumerate(ds)]
        if args.method == "sstoken" and (args.gamma < 1 or args.rel_warmup > 0) and \
                not any(IGNORE_INDEX in e.labels[1:] for e in examples):
            raise UsageError("ssToken's attention score needs a prompt, but every token is trained "
                             "on: use a prompt-completion dataset (completion_only_loss) or a "
                             "conversational one with assistant_only_loss=True, or gamma=1")
        from ..losses import LossProvider
        from ..methods import get_method

        losses = LossProvider(ModelArguments(model=_model_name(self.model), dtype="float32",
                                             loss_chunk_size=args.loss_chunk_size),
                              DataArguments(data="trl", template="chat",
                                            max_seq_length=args.max_length or 1_000_000),
                              module=self.model)
        get_method(args).prepare(examples, losses)
        per_token = tuple(f for f in PER_TOKEN_FIELDS if f in examples[0].extra)
        ds = ds.add_column(INDEX, list(range(len(examples))))
        for name in per_token:
            ds = ds.add_column(name, [e.extra[name] for e in examples])
        self.train_dataset = ds
        self.data_collator = _SelectionCollator(self.data_collator, per_token)
        self.init_selection(args, args.loss_chunk_size, examples)

    def train(self, *args, **kwargs):
        """``SFTTrainer.train``, then ``selection.jsonl`` (the saved per-token records, for
        ``sstoken show``) in ``output_dir``, as ``sstoken train`` writes it."""
        result = super().train(*args, **kwargs)
        self.write_records(os.path.join(self.args.output_dir, "selection.jsonl"))
        return result

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, INDEX, *PER_TOKEN_FIELDS]
