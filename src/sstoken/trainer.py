"""``SelectionTrainer``: a ``transformers.Trainer`` whose loss trains on selected tokens only.

``compute_loss`` = per-token losses of the forward (chunked, no full fp32 logits) -> scores of
the chosen method -> keep mask -> NLL of kept tokens / kept tokens of the whole optimizer step
(Eq. 10). Everything else (accelerate, DeepSpeed/FSDP, gradient accumulation, checkpoints,
resume, logging, ``report_to``) is the Trainer's own.

Normalization: ``get_batch_samples`` counts the tokens each micro-batch *will* keep (a
deterministic function of the labels, rho and the method) over the whole optimizer step and
all processes, and passes it as ``num_items_in_batch``. ``compute_loss`` divides by it and
multiplies by the number of processes (DDP averages gradients), so gradient accumulation 1x8,
8x1 and 2 processes x 4 give the same update as one batch of 8 (tested).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback

from . import attention
from .config import SelectionArguments
from .modeling import adapter_disabled, forward_token_losses, is_peft, unwrap
from .scoring import (IGNORE_INDEX, attention_driven, excess_loss, minmax_normalize, num_keep,
                      pearson, select_random, select_top_flat, select_top_per_sample,
                      selected_loss, sstoken_score)


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """R as a (B, L) bool mask; position 0 is never a target (nothing predicts it)."""
    resp = labels != IGNORE_INDEX
    resp[:, 0] = False
    return resp


def expected_kept(batch: dict, sel: SelectionArguments) -> int:
    """How many tokens the method keeps in this micro-batch, known before the forward."""
    resp = response_mask(batch["labels"])
    if sel.method == "full":
        return int(resp.sum())
    if sel.method == "tokencleaning":
        return int((batch["keep"].bool() & resp).sum())
    if sel.scope == "batch":
        return int(num_keep(int(resp.sum()), sel.rho))
    return int(num_keep(resp.sum(dim=1), sel.rho).sum())


class TrainableEMA:
    """EMA of the trainable parameters (Eq. 4: his <- a * his + (1 - a) * theta).

    With LoRA the trainable parameters are the adapter factors A and B, so the history model
    is ``W0 + s * EMA(B) @ EMA(A)``. This is not ``EMA(B @ A)``: keeping that would need a
    full-rank delta per adapted matrix (the memory of the whole model), which LoRA exists to
    avoid; an EMA of the factors costs one adapter copy. At step 0 B = 0, so both start at
    the base model.
    """

    def __init__(self, model, alpha: float):
        self.alpha = alpha
        self.params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].mul_(self.alpha).add_(p.detach(), alpha=1 - self.alpha)

    @contextlib.contextmanager
    def swapped(self):
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])


EMA_FILE = "sstoken_ema.safetensors"


class _EMACallback(TrainerCallback):
    """Update the EMA after every optimizer step; save it with every checkpoint."""

    def __init__(self, ema: TrainableEMA):
        self.ema = ema

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.update()

    def on_save(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            save_file({n: t.contiguous() for n, t in self.ema.shadow.items()}, os.path.join(ckpt, EMA_FILE))


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class SelectionTrainer(Trainer):
    """Trainer with token selection. Extra batch fields (from the collator): ``index`` (B,),
    and per method ``history_loss`` / ``ref_loss`` / ``keep`` (B, L)."""

    def __init__(self, *args, selection: SelectionArguments, loss_chunk_size: int = 1024,
                 examples=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sel = selection
        self.loss_chunk_size = loss_chunk_size
        self.examples = examples
        # We return a loss already normalized over the whole optimizer step.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.hook = None
        if selection.method == "sstoken" and selection.gamma < 1:
            self.hook = attention.install(self.model, selection.attn_layer)
        self.ema = None
        self.history_model = None
        if selection.method == "sstoken" and selection.gamma > 0:
            if selection.history == "ema":
                self.ema = TrainableEMA(self.model, selection.ema_alpha)
                self.add_callback(_EMACallback(self.ema))
            elif not is_peft(self.model) and not self._has_cached_history():
                # Full fine-tuning with online base losses needs a frozen copy of the base.
                self.history_model = copy.deepcopy(unwrap(self.model)).eval().requires_grad_(False)
        self._stats = defaultdict(float)
        self.records: dict[str, dict] = {}

    def train(self, resume_from_checkpoint=None, **kwargs):
        """The Trainer's train; on resume, the EMA history is restored from the checkpoint."""
        if resume_from_checkpoint and self.ema is not None:
            from safetensors.torch import load_file
            from transformers.trainer_utils import get_last_checkpoint

            ckpt = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) \
                else get_last_checkpoint(self.args.output_dir)
            path = os.path.join(ckpt, EMA_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: the checkpoint has no EMA history to resume from")
            for n, t in load_file(path).items():
                self.ema.shadow[n].copy_(t)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _has_cached_history(self) -> bool:
        ds = self.train_dataset
        return ds is not None and len(ds) > 0 and "history_loss" in ds[0]

    # ------------------------------------------------------------------ normalization
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        n = torch.tensor(sum(expected_kept(b, self.sel) for b in batch_samples),
                         dtype=torch.float32, device=device)
        if self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return batch_samples, n

    def effective_gamma(self) -> float:
        """gamma, or 0 during the REL warm-up (the first ``rel_warmup`` of the steps)."""
        if self.sel.rel_warmup > 0 and self.state.max_steps:
            if self.state.global_step < self.sel.rel_warmup * self.state.max_steps:
                return 0.0
        return self.sel.gamma

    # ------------------------------------------------------------------ losses
    @torch.no_grad()
    def history_losses(self, model, input_ids, attention_mask, resp) -> torch.Tensor:
        """Online loss of the history model (B, L), no grad, dropout off."""
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, mask=resp,
                  chunk_size=self.loss_chunk_size)
        if self.ema is not None:
            with self.ema.swapped(), _eval_mode(unwrap(model)):
                return forward_token_losses(unwrap(model), **kw)
        if self.history_model is not None:
            return forward_token_losses(self.history_model, **kw)
        with adapter_disabled(model), _eval_mode(unwrap(model)):
            return forward_token_losses(unwrap(model), **kw)

    def with_history(self, model, inputs, resp, gamma):
        """Add online ``history_loss`` (B, L) to the inputs when sstoken needs it and no cache
        supplied it. Runs before the training forward: an EMA swap must not modify weights
        that the training graph has saved for backward."""
        if self.sel.method == "sstoken" and gamma > 0 and "history_loss" not in inputs:
            hist = self.history_losses(model, inputs["input_ids"], inputs["attention_mask"], resp)
            inputs = {**inputs, "history_loss": hist}
        return inputs

    def select(self, inputs, cur, resp, attn, gamma):
        """Keep mask (B, L) and the per-token parts of the score, per method."""
        sel, parts = self.sel, {}
        if sel.method == "full":
            return resp.clone(), parts
        if sel.method == "random":
            epoch = int(self.state.epoch or 0)
            gens = [torch.Generator().manual_seed(hash((self.args.seed, epoch, int(i))) & 0x7FFFFFFF)
                    for i in inputs["index"].tolist()]
            return select_random(resp, sel.rho, gens), parts
        if sel.method == "tokencleaning":
            return inputs["keep"].bool() & resp, parts
        if sel.method == "rho1":
            score = excess_loss(cur, inputs["ref_loss"], resp)   # EL = current - reference
            parts["score"] = score
        else:  # sstoken
            if gamma > 0:
                rel = excess_loss(inputs["history_loss"], cur, resp)
                rel_norm = minmax_normalize(rel, resp)
                parts.update(rel=rel, rel_norm=rel_norm)
            else:
                rel_norm = torch.zeros_like(cur)
            attn = attn if attn is not None else torch.zeros_like(cur)
            parts["attn_score"] = attn
            score = sstoken_score(rel_norm, attn, resp, gamma)
            parts["score"] = score
            parts["by_attention"] = attention_driven(rel_norm, attn, gamma) & resp
        if sel.scope == "batch":
            keep = select_top_flat(score, resp, int(num_keep(int(resp.sum()), sel.rho)))
        else:
            keep = select_top_per_sample(score, resp, sel.rho)
        return keep, parts

    def forward_select(self, model, inputs):
        """One forward with selection: ``(cur (B, L) with grad, resp, keep, parts, gamma, inputs)``."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        resp = response_mask(inputs["labels"])
        gamma = self.effective_gamma()
        inputs = self.with_history(model, inputs, resp, gamma)   # before the training forward
        want_attn = self.hook is not None and gamma < 1
        if want_attn:
            self.hook.arm(attention_mask.bool() & ~resp)            # P: non-pad, not response
        cur = forward_token_losses(model, input_ids, attention_mask, resp, self.loss_chunk_size)
        attn = self.hook.take() if want_attn else None
        keep, parts = self.select(inputs, cur.detach(), resp, attn, gamma)
        expected = expected_kept(inputs, self.sel)
        if int(keep.sum()) != expected:
            raise RuntimeError(f"kept {int(keep.sum())} tokens, expected {expected}")
        return cur, resp, keep, parts, gamma, inputs

    @torch.no_grad()
    def score_batch(self, inputs) -> None:
        """Score and select one batch without training; records go to ``self.records``."""
        with _eval_mode(unwrap(self.model)):
            cur, resp, keep, parts, gamma, inputs = self.forward_select(self.model, inputs)
        self._save_records(inputs, cur, resp, keep, parts, gamma)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cur, resp, keep, parts, gamma, inputs = self.forward_select(model, inputs)
        if num_items_in_batch is None:
            n = keep.sum().clamp(min=1)
        else:
            n = num_items_in_batch
        loss = selected_loss(cur, keep, n)
        if num_items_in_batch is not None and self.args.world_size > 1:
            loss = loss * self.args.world_size                        # DDP averages gradients
        if model.training:
            self._record(inputs, cur.detach(), resp, keep, parts, gamma)
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------ statistics
    def _record(self, inputs, cur, resp, keep, parts, gamma):
        s = self._stats
        s["n"] += 1
        s["kept"] += float(keep.sum())
        s["resp"] += float(resp.sum())
        if "rel" in parts:
            s["rel_sum"] += float(parts["rel"][resp].sum())
            s["rel_tokens"] += float(resp.sum())
        if "attn_score" in parts and gamma < 1:
            s["attn_sum"] += float(parts["attn_score"][resp].sum())
            s["attn_tokens"] += float(resp.sum())
        if "rel" in parts and "attn_score" in parts and gamma < 1:
            c = pearson(parts["rel"][resp], parts["attn_score"][resp])
            if c == c:
                s["corr_sum"] += c
                s["corr_n"] += 1
        if "by_attention" in parts:
            s["attn_driven"] += float((parts["by_attention"] & keep).sum())
            s["attn_driven_n"] += 1
        self._save_records(inputs, cur, resp, keep, parts, gamma)

    def log(self, logs, *args, **kwargs):
        s = self._stats
        if "loss" in logs and s["n"]:
            logs["sel/kept_frac"] = s["kept"] / max(s["resp"], 1)
            if s["rel_tokens"]:
                logs["sel/rel_mean"] = s["rel_sum"] / s["rel_tokens"]
            if s["attn_tokens"]:
                logs["sel/attn_mean"] = s["attn_sum"] / s["attn_tokens"]
            if s["corr_n"]:
                logs["sel/rel_attn_corr"] = s["corr_sum"] / s["corr_n"]
            if s["attn_driven_n"]:
                logs["sel/attn_driven_frac"] = s["attn_driven"] / max(s["kept"], 1)
            self._stats = defaultdict(float)
        return super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saved scores
    def _save_records(self, inputs, cur, resp, keep, parts, gamma):
        if not self.sel.save_scores or self.examples is None:
            return
        tok = self.processing_class
        for b, idx in enumerate(inputs["index"].tolist()):
            if idx >= self.sel.save_scores:
                continue
            ex = self.examples[idx]
            n = len(ex.input_ids)
            r = resp[b, :n].tolist()

            def col(t, cast=float):
                if t is None:
                    return None
                vals = t[b, :n].tolist()
                return [cast(v) if rr else None for v, rr in zip(vals, r)]

            self.records[ex.id] = {
                "id": ex.id, "method": self.sel.method, "step": int(self.state.global_step),
                "gamma": gamma if self.sel.method == "sstoken" else None, "rho": self.sel.rho,
                "tokens": [tok.decode([t]) for t in ex.input_ids] if tok is not None else None,
                "response": r, "keep": keep[b, :n].tolist(),
                "loss": col(cur), "rel": col(parts.get("rel")),
                "rel_norm": col(parts.get("rel_norm")), "attn_score": col(parts.get("attn_score")),
                "score": col(parts.get("score")),
                "by_attention": [bool(v) and k for v, k in zip(
                    parts["by_attention"][b, :n].tolist(), keep[b, :n].tolist())]
                if "by_attention" in parts else [False] * n,
            }

    def write_records(self, path: str) -> str | None:
        """Write the saved per-token scores as JSONL (atomically)."""
        if not self.records:
            return None
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            for rec in self.records.values():
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
        return path
