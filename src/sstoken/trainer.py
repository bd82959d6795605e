"""``SelectionTrainer``: a ``transformers.Trainer`` whose loss trains on selected tokens only.

``compute_loss`` reads top to bottom: response set R -> history losses if the method needs
them -> one training forward (chunked per-token losses, attention score captured inside it)
-> the method's keep mask -> NLL of kept tokens / kept tokens of the whole optimizer step
(Eq. 10). Everything else (accelerate, DeepSpeed/FSDP, gradient accumulation, checkpoints,
resume, logging, ``report_to``) is the Trainer's own.

Normalization: ``get_batch_samples`` counts the tokens each micro-batch *will* keep
(:meth:`sstoken.methods.Method.num_kept`, a function of the labels alone) over the whole
optimizer step and all processes, and passes it as ``num_items_in_batch``. ``compute_loss``
divides by it and multiplies by the number of processes (DDP averages gradients), so gradient
accumulation 1x8, 8x1 and 2 processes x 4 give the same update as one batch of 8 (tested).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer

from . import attention
from .args import SelectionArguments
from .data import DATA_WEIGHT
from .history import BaseHistory, EMAHistory, EpochHistory, eval_mode
from .methods import Selection, Tokens, get_method
from .weightings import get_weighting
from .modeling import forward_token_stats, unwrap
from .io import atomic_write
from .records import write_scores
from .scoring import pearson, response_mask, selected_loss, sink_keys, unlearned_rho


STATE_FILE = "sstoken_state.json"


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` of ``output_dir`` whose files were all written (it has its
    ``trainer_state.json``, written last, and sstoken's state), or None."""
    if not os.path.isdir(output_dir):
        return None
    done = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and name[11:].isdigit() and \
                os.path.exists(os.path.join(path, "trainer_state.json")) and \
                os.path.exists(os.path.join(path, STATE_FILE)):
            done.append((int(name[11:]), path))
    return max(done)[1] if done else None


class SelectionStats:
    """Selection statistics accumulated between two logging steps (``sel/*`` in the logs)."""

    def __init__(self):
        self.s = defaultdict(float)

    def add(self, t: Tokens, sel: Selection) -> None:
        s, resp, rec = self.s, t.resp, sel.record
        s["n"] += 1
        s["kept"] += float(sel.keep.sum())
        s["resp"] += float(resp.sum())
        if "rel" in rec:
            s["rel_sum"] += float(rec["rel"][resp].sum())
            s["rel_tokens"] += float(resp.sum())
        attn_used = sel.gamma is not None and sel.gamma < 1 and "attn_score" in rec
        if attn_used:
            s["attn_sum"] += float(rec["attn_score"][resp].sum())
            s["attn_tokens"] += float(resp.sum())
        if attn_used and "rel" in rec:
            c = pearson(rec["rel"][resp], rec["attn_score"][resp])
            if c == c:
                s["corr_sum"] += c
                s["corr_n"] += 1
        if "by_attention" in rec:
            s["attn_driven"] += float(rec["by_attention"].sum())
            s["attn_driven_n"] += 1
        if "weight" in rec:                     # a weighting: its mean, and the plain NLL beside it
            s["weight_sum"] += float(rec["weight"][sel.keep].sum())
            s["nll_sum"] += float(t.loss[sel.keep].sum())
        if sel.kl is not None:
            s["kl_sum"] += float(sel.kl.detach()[sel.keep].sum())

    KEYS = ("n", "kept", "resp", "rel_sum", "rel_tokens", "attn_sum", "attn_tokens", "corr_sum",
            "corr_n", "attn_driven", "attn_driven_n", "weight_sum", "nll_sum", "kl_sum")

    def reduced(self, accelerator) -> dict[str, float]:
        """The statistics summed over every process (a collective call)."""
        t = torch.tensor([self.s[k] for k in self.KEYS], dtype=torch.float64,
                         device=accelerator.device)
        t = accelerator.reduce(t, reduction="sum")
        return dict(zip(self.KEYS, t.tolist()))

    def reduce(self, accelerator) -> None:
        """Sum the statistics over every process (each rank saw its own micro-batches)."""
        self.s = defaultdict(float, self.reduced(accelerator))

    def pop(self) -> dict[str, float]:
        """The statistics since the last call (over every process once reduced), then reset."""
        s, out = self.s, {}
        if not s["n"]:
            self.s = defaultdict(float)
            return out
        out["sel/kept_frac"] = s["kept"] / max(s["resp"], 1)
        if s["rel_tokens"]:
            out["sel/rel_mean"] = s["rel_sum"] / s["rel_tokens"]
        if s["attn_tokens"]:
            out["sel/attn_mean"] = s["attn_sum"] / s["attn_tokens"]
        if s["corr_n"]:
            out["sel/rel_attn_corr"] = s["corr_sum"] / s["corr_n"]
        if s["attn_driven_n"]:
            out["sel/attn_driven_frac"] = s["attn_driven"] / max(s["kept"], 1)
        if s["weight_sum"]:
            out["sel/weight_mean"] = s["weight_sum"] / max(s["kept"], 1)     # over kept tokens
            out["sel/nll_kept"] = s["nll_sum"] / max(s["kept"], 1)           # unweighted NLL
        if s["kl_sum"]:
            out["sel/kl_mean"] = s["kl_sum"] / max(s["kept"], 1)             # ASFT: KL to the base
        self.s = defaultdict(float)
        return out


class SelectionMixin:
    """Token selection for any ``transformers.Trainer`` subclass: put it first in the bases
    (``class T(SelectionMixin, SomeTrainer)``) and call :meth:`init_selection` at the end of
    ``__init__``. :class:`SelectionTrainer` (plain ``Trainer``) and
    ``sstoken.integrations.trl.SSTokenSFTTrainer`` (TRL's ``SFTTrainer``) are the two.

    Batches carry ``input_ids``, ``attention_mask``, ``labels`` (-100 off R), ``index`` (B,) and
    the per-token fields methods attached (``history_loss``, ``ref_loss``, ``keep``).
    """

    def init_selection(self, selection: SelectionArguments, loss_chunk_size: int = 1024,
                       examples=None) -> None:
        self.sel = selection
        self.method = get_method(selection)
        self.weighting = get_weighting(selection)
        self.loss_chunk_size = loss_chunk_size
        self.examples = examples
        # We return a loss already normalized over the whole optimizer step.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.hook = None                       # the attention hook, while installed
        self.history = None
        if selection.method == "sstoken" and selection.gamma > 0:
            if selection.history == "ema":
                self.history = EMAHistory(self.model, selection.ema_alpha)
                self.add_callback(self.history.callback)
            elif selection.history == "epoch":
                self.history = EpochHistory(self.model)
                self.add_callback(self.history.callback)
            elif not self._has_cached_history():
                self.history = BaseHistory(self.model)
        self.reference = None                  # the frozen base a weighting anchors to (ASFT)
        if self.weighting.needs_reference:
            self.reference = self.history if isinstance(self.history, BaseHistory) \
                else BaseHistory(self.model)
        self.stats = SelectionStats()
        self.unlearned = [0.0, 0.0]            # --rho_rule unlearned: (unlearned, response) tokens
        self.records: dict[str, dict] = {}
        self.started, self.seconds_before = time.time(), 0.0   # seconds trained before a resume

    @property
    def seconds(self) -> float:
        """Seconds of training, including the part before a resume."""
        return self.seconds_before + time.time() - self.started

    @property
    def ema(self):
        return self.history.ema if isinstance(self.history, EMAHistory) else None

    def _has_cached_history(self) -> bool:
        ds = self.train_dataset
        return ds is not None and len(ds) > 0 and "history_loss" in ds[0]

    @contextlib.contextmanager
    def attention_hook(self):
        """The attention hook installed for the block when the method may need it."""
        probe = self.method.needs(0, 10 ** 9), self.method.needs(10 ** 9, 10 ** 9)   # start, end
        if not any(n.attention for n in probe):
            yield
            return
        with attention.installed(self.model, self.sel.attn_layer) as hook:
            self.hook = hook
            try:
                yield
            finally:
                self.hook = None

    def train(self, resume_from_checkpoint=None, **kwargs):
        """The Trainer's train. On resume (a checkpoint folder, or True for the last complete
        one), sstoken's own state comes back too: the EMA history, the saved per-token
        records, the statistics since the last log and the seconds already trained."""
        if resume_from_checkpoint:
            if not isinstance(resume_from_checkpoint, str):
                resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    from .errors import UsageError

                    raise UsageError(f"resume_from_checkpoint=True: {self.args.output_dir} has no "
                                     "complete checkpoint (trainer_state.json and sstoken_state.json)")
            self.load_extra_state(resume_from_checkpoint)
        with self.attention_hook():
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def save_extra_state(self, folder: str) -> None:
        """sstoken's state into a checkpoint folder. Every rank calls it (the records are
        gathered from all of them); the main process writes."""
        records = self.all_records()
        stats = self.stats.reduced(self.accelerator) if self.args.world_size > 1 else dict(self.stats.s)
        unlearned = self._unlearned_counts()                  # collective calls: every rank
        history = self.ema.state_dict() if self.ema is not None else None     # gathered whole
        if not self.args.should_save:
            return
        if history is not None:
            self.ema.save(history, folder)
        state = {"seconds": self.seconds_before + time.time() - self.started,
                 "stats": stats, "records": records, "rho": self.method.rho,
                 "unlearned": unlearned}
        if isinstance(self.history, EpochHistory):
            state["history_epoch"] = self.history.epoch
        atomic_write(Path(folder) / STATE_FILE, json.dumps(state))

    def all_records(self) -> dict[str, dict]:
        """The saved records of every process (each saw its own examples), each example once
        (its latest step), in data order. A collective call under several processes."""
        records = self.records
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, self.records)
            records = {}
            for part in parts:
                for k, r in part.items():
                    if k not in records or r["step"] > records[k]["step"]:
                        records[k] = r
        order = {ex.id: i for i, ex in enumerate(self.examples or [])}
        return dict(sorted(records.items(), key=lambda kv: order.get(kv[0], len(order))))

    def load_extra_state(self, folder: str) -> None:
        if self.ema is not None:
            self.ema.load(folder)
        path = Path(folder) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: the checkpoint has no sstoken state to resume from "
                                    "(written by another tool, or incomplete)")
        state = json.loads(path.read_text())
        self.seconds_before = state["seconds"]
        if self.is_world_process_zero():       # the saved statistics are already over all ranks
            self.stats.s.update(state["stats"])
            self.unlearned = list(state.get("unlearned", [0.0, 0.0]))    # likewise
        self.method.rho = state.get("rho", self.sel.rho)
        if isinstance(self.history, EpochHistory):
            self.history.epoch = state["history_epoch"]
        self.records = state["records"]

    def _save_rng_state(self, output_dir):
        """The Trainer writes a checkpoint's files, then its ``trainer_state.json`` last; this
        hook runs just before that, so a checkpoint with ``trainer_state.json`` has sstoken's
        state too (a kill in between leaves it incomplete, and resuming skips it)."""
        super()._save_rng_state(output_dir)
        self.save_extra_state(output_dir)

    # ------------------------------------------------------------------ normalization
    def _unlearned_counts(self) -> list[float]:
        """The (unlearned, response) token counts since the last step, over every process."""
        if self.args.world_size == 1:
            return list(self.unlearned)
        t = torch.tensor(self.unlearned, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.sel.rho_rule == "unlearned":           # this step's rho from the last one's tokens
            counts = self._unlearned_counts()          # (a collective call: every rank is here)
            if counts[1] > 0:
                self.method.rho = unlearned_rho(*counts)
            self.unlearned = [0.0, 0.0]
        kept = sum(self.method.num_kept(response_mask(b["labels"]), b) for b in batch_samples)
        n = torch.tensor(kept, dtype=torch.float32, device=device)
        if self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return batch_samples, n.clamp(min=1)       # a step that keeps nothing: loss 0, not 0/0

    # ------------------------------------------------------------------ the loss
    def forward_select(self, model, inputs) -> tuple[torch.Tensor, Tokens, Selection]:
        """One training forward and the method's selection: ``(loss (B, L) with grad, the
        per-token inputs of the method, its selection)``."""
        resp = response_mask(inputs["labels"])                               # R (B, L)
        step, max_steps = int(self.state.global_step), int(self.state.max_steps or 0)
        needs = self.method.needs(step, max_steps)
        epoch = int((self.state.epoch or 0) + 1e-6)    # the epoch this forward belongs to
        if isinstance(self.history, EpochHistory):
            self.history.start_epoch(epoch)            # before the first update of a new epoch
        history = inputs.get("history_loss")
        if needs.history and history is None:          # before the training forward (EMA swap)
            history = self.history.losses(model, inputs["input_ids"], inputs["attention_mask"],
                                          resp, self.loss_chunk_size)
        if needs.attention:
            sink = sink_keys(inputs["attention_mask"], self.sel.attn_sink) if self.sel.attn_sink else None
            self.hook.arm(inputs["attention_mask"].bool() & ~resp, sink)    # P: non-pad, not R
        reference = None
        if self.weighting.needs_reference:              # before the training forward, like history
            reference = self.reference.reference(model, inputs["input_ids"], inputs["attention_mask"])
        stats = forward_token_stats(model, inputs["input_ids"], inputs["attention_mask"], resp,
                                    self.loss_chunk_size, self.weighting.topk, reference)
        loss = stats.loss                                                    # (B, L) with grad
        t = Tokens(resp=resp, loss=loss.detach(), index=inputs["index"], step=step,
                   max_steps=max_steps, epoch=epoch, seed=self.args.seed,
                   history_loss=history, ref_loss=inputs.get("ref_loss"),
                   keep=inputs.get("keep"),
                   attn_score=self.hook.take() if needs.attention else None)
        sel = self.method.select(t)
        expected = self.method.num_kept(resp, inputs)
        if int(sel.keep.sum()) != expected:
            raise RuntimeError(f"{self.sel.method} kept {int(sel.keep.sum())} tokens, expected {expected}")
        sel.weight = self.weighting.weights(t.loss, stats.entropy, sel.keep)   # (B, L), 0 off kept
        if DATA_WEIGHT in inputs:                                            # weights given in the data
            sel.weight = sel.weight * inputs[DATA_WEIGHT].to(sel.weight.dtype)
        sel.kl = stats.kl                                                    # (B, L) with grad, ASFT
        if self.sel.weighting != "none" or DATA_WEIGHT in inputs:
            sel.record["weight"] = sel.weight
        return loss, t, sel

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:                 # evaluation: the plain NLL of every response token
            resp = response_mask(inputs["labels"])
            loss_tok = forward_token_stats(model, inputs["input_ids"], inputs["attention_mask"],
                                           resp, self.loss_chunk_size).loss
            loss = selected_loss(loss_tok, resp.to(loss_tok.dtype), resp.sum().clamp(min=1))
            return (loss, None) if return_outputs else loss
        loss_tok, t, sel = self.forward_select(model, inputs)
        n = sel.keep.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = selected_loss(loss_tok, sel.weight, n)                        # Eq. 10, weighted
        if sel.kl is not None:                                               # ASFT's anchor
            loss = loss + self.weighting.kl_alpha * selected_loss(sel.kl, sel.keep, n)
        if num_items_in_batch is not None and self.args.world_size > 1:
            loss = loss * self.args.world_size                               # DDP averages gradients
        if model.training:
            self.stats.add(t, sel)
            self._save_records(t, sel)
            if self.sel.rho_rule == "unlearned":
                unlearned = t.loss > -math.log(self.sel.learned_prob)               # (B, L) on R
                self.unlearned[0] += float((unlearned & t.resp).sum())
                self.unlearned[1] += float(t.resp.sum())
        return (loss, None) if return_outputs else loss

    @torch.no_grad()
    def score_batch(self, inputs) -> None:
        """Score and select one batch without training; records go to ``self.records``."""
        with self.attention_hook(), eval_mode(unwrap(self.model)):
            _, t, sel = self.forward_select(self.model, inputs)
        self._save_records(t, sel)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:                      # a training log: every rank calls this
            if self.args.world_size > 1:
                self.stats.reduce(self.accelerator)
            logs.update(self.stats.pop())
            if self.sel.rho_rule != "fixed":
                logs["sel/rho"] = self.method.rho
        return super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saved scores
    def _save_records(self, t: Tokens, sel: Selection) -> None:
        """Per-token records (schema: :mod:`sstoken.records`) of the first ``save_scores``
        examples, for ``sstoken show``."""
        if not self.sel.save_scores or self.examples is None:
            return
        tok = self.processing_class
        for b, idx in enumerate(t.index.tolist()):
            if idx >= self.sel.save_scores:
                continue
            ex = self.examples[idx]
            n = len(ex.input_ids)
            r = t.resp[b, :n].tolist()

            def col(x):
                return [float(v) if rr else None for v, rr in zip(x[b, :n].tolist(), r)]

            rec = {"id": ex.id, "method": self.sel.method, "step": int(self.state.global_step),
                   "gamma": sel.gamma, "rho": self.method.rho,
                   "tokens": [tok.decode([i]) for i in ex.input_ids] if tok is not None else None,
                   "response": r, "keep": sel.keep[b, :n].tolist(), "loss": col(t.loss),
                   "by_attention": [False] * n}
            for name, x in sel.record.items():
                rec[name] = x[b, :n].tolist() if x.dtype == torch.bool else col(x)
            self.records[ex.id] = rec

    def write_records(self, path: str) -> str | None:
        """Write the saved per-token records of every process as JSONL (atomically, main
        process). Every rank must call it (the records are gathered)."""
        records = self.all_records()
        if not records or not self.is_world_process_zero():
            return None
        return str(write_scores(path, records.values()))


class SelectionTrainer(SelectionMixin, Trainer):
    """A ``transformers.Trainer`` with token selection (and any ``Trainer`` argument).

    Args:
        selection: the method and its options (:class:`sstoken.args.SelectionArguments`).
        loss_chunk_size: rows projected to the vocabulary at once (0 = full logits).
        examples: the training examples (for the saved per-token records).
        **kwargs: passed to ``transformers.Trainer``; batches come from
            :class:`sstoken.data.Collator`.

    Example::

        trainer = SelectionTrainer(model=model, args=TrainArguments(output_dir="out"),
                                   train_dataset=ExampleDataset(examples),
                                   data_collator=Collator(tok.pad_token_id), processing_class=tok,
                                   selection=SelectionArguments(method="sstoken"), examples=examples)
        trainer.train()
    """

    def __init__(self, *args, selection: SelectionArguments, loss_chunk_size: int = 1024,
                 examples=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_selection(selection, loss_chunk_size, examples)
