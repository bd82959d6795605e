"""The ssToken history model (Eq. 3-4): whose losses REL is measured against.

* :class:`BaseHistory` - the model before SFT. With LoRA: the same network with the adapter
  disabled (no second copy in memory). With full fine-tuning: a frozen copy made at the start.
  (When the base losses come from the ``sstoken score`` cache, no history forward runs.)
* :class:`EMAHistory` - Eq. 4, ``his <- a * his + (1 - a) * theta`` after every optimizer
  step, over the trainable parameters (:class:`TrainableEMA`); saved with every checkpoint
  (``sstoken_ema.safetensors``) and restored on resume.
* :class:`EpochHistory` - beyond the paper: the trainable parameters as they were at the start
  of the current epoch (in epoch 1 the base model), the same copy swapped in the same way,
  saved and restored the same way (its epoch in ``sstoken_state.json``).

Each gives ``losses(model, input_ids, attention_mask, resp) -> (B, L)``: a no-grad forward in
eval mode (dropout off). The trainer calls it *before* the training forward, because the EMA
swaps weights in place and must not modify weights a training graph has saved for backward.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from transformers import TrainerCallback

from .modeling import (adapter_disabled, decoder_hidden, forward_token_losses, is_peft,
                       lm_head_weight, unwrap)
from .sharded import local, piece_of, refresh, whole

EMA_FILE = "sstoken_ema.safetensors"


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the block; the previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class TrainableEMA:
    """EMA of the trainable parameters (Eq. 4: his <- a * his + (1 - a) * theta).

    With LoRA the trainable parameters are the adapter factors A and B, so the history model
    is ``W0 + s * EMA(B) @ EMA(A)``. This is not ``EMA(B @ A)``: keeping that would need a
    full-rank delta per adapted matrix (the memory of the whole model), which LoRA exists to
    avoid; an EMA of the factors costs one adapter copy. At step 0 B = 0, so both start at
    the base model.

    Under a sharding engine (FSDP2, ZeRO-3) the copy is as sharded as the parameters: each
    rank keeps the piece it owns (:mod:`sstoken.sharded`), and only saving gathers it.
    :meth:`bind` must see the parameters as the engine left them: the trainer calls it when
    training starts (after ``accelerator.prepare``), and builds the EMA with ``bind=False`` so
    that no whole copy of the unsharded parameters is made before that.
    """

    def __init__(self, model, alpha: float, bind: bool = True):
        self.alpha = alpha
        self.loaded: dict[str, torch.Tensor] | None = None     # whole tensors, from a checkpoint
        self.model, self.params, self.shadow = unwrap(model), {}, {}
        if bind:
            self.bind(model)

    def bind(self, model) -> None:
        """Track ``model``'s live trainable parameters and copy them; a copy loaded from a
        checkpoint before (:meth:`load`) replaces that copy here."""
        self.model = unwrap(model)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.shadow = {n: local(p).detach().clone() for n, p in self.params.items()}
        if self.loaded is not None:
            missing = sorted(set(self.shadow) - set(self.loaded))
            if missing:
                from .errors import UsageError

                raise UsageError(f"{self.loaded_from}: the saved history has no {missing[0]} "
                                 f"({len(missing)} parameters missing): the checkpoint belongs to "
                                 "another model or adapter")
            for n, p in self.params.items():
                self.shadow[n].copy_(piece_of(self.loaded[n], p))
            self.loaded = None

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].mul_(self.alpha).add_(local(p).detach(), alpha=1 - self.alpha)

    @torch.no_grad()
    def snapshot(self) -> None:
        """The shadow becomes an exact copy of the live parameters."""
        for n, p in self.params.items():
            self.shadow[n].copy_(local(p).detach())

    @contextlib.contextmanager
    def swapped(self):
        params = list(self.params.values())
        backup = {n: local(p).detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                local(p).copy_(self.shadow[n])
        refresh(self.model, params)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    local(p).copy_(backup[n])
            refresh(self.model, params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow as whole tensors (gathered from the shards: a collective call)."""
        return {n: whole(self.shadow[n], p).contiguous() for n, p in self.params.items()}

    @staticmethod
    def save(tensors: dict[str, torch.Tensor], folder: str) -> None:
        from safetensors.torch import save_file

        save_file({n: t.cpu() for n, t in tensors.items()}, os.path.join(folder, EMA_FILE))

    def load(self, folder: str) -> None:
        """Read a saved shadow; it takes effect at the next :meth:`bind` (training start)."""
        from safetensors.torch import load_file

        path = os.path.join(folder, EMA_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: the checkpoint has no EMA history to resume from")
        self.loaded, self.loaded_from = load_file(path), path


class _HistoryCallback(TrainerCallback):
    """Bind the copy to the live parameters when training starts (after the engine wrapped
    them), and update the EMA after every optimizer step (``update=False``: the epoch copy,
    which changes only at epoch starts). (The trainer saves the copy with each checkpoint,
    before the checkpoint's ``trainer_state.json``: see ``SelectionTrainer.save_extra_state``.)"""

    def __init__(self, ema: TrainableEMA, update: bool = True):
        self.ema, self.update = ema, update

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema.bind(model)

    def on_step_end(self, args, state, control, **kwargs):
        if self.update:
            self.ema.update()


class BaseHistory:
    """The base model: the adapter disabled (LoRA) or a frozen copy (full fine-tuning)."""

    def __init__(self, model):
        self.frozen = None
        if not is_peft(model):
            self.frozen = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
            # A forward patched onto the instance (TRL's fused LM head, accelerate's autocast
            # wrapper) is a closure over the *live* model: the copy must run its own class's.
            self.frozen.__dict__.pop("forward", None)

    @torch.no_grad()
    def losses(self, model, input_ids, attention_mask, resp, chunk_size: int) -> torch.Tensor:
        if self.frozen is not None:
            return forward_token_losses(self.frozen, input_ids, attention_mask, resp, chunk_size)
        with adapter_disabled(model), eval_mode(unwrap(model)):
            return forward_token_losses(unwrap(model), input_ids, attention_mask, resp, chunk_size)


    @torch.no_grad()
    def reference(self, model, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base model's final hidden states (B, L, H) and its LM head weight (V, H): what a
        KL to the base needs (ASFT), without building its logits. With LoRA the head is the
        live model's own (the adapter never touches it): None, read inside the head's call."""
        if self.frozen is not None:
            return decoder_hidden(self.frozen, input_ids, attention_mask), lm_head_weight(self.frozen)
        with adapter_disabled(model), eval_mode(unwrap(model)):
            return decoder_hidden(unwrap(model), input_ids, attention_mask), None


class EMAHistory:
    """Eq. 4: the trained weights' EMA, swapped in for a no-grad forward."""

    def __init__(self, model, alpha: float):
        self.ema = TrainableEMA(model, alpha, bind=False)     # bound when training starts
        self.callback = _HistoryCallback(self.ema)

    @torch.no_grad()
    def losses(self, model, input_ids, attention_mask, resp, chunk_size: int) -> torch.Tensor:
        with self.ema.swapped(), eval_mode(unwrap(model)):
            return forward_token_losses(unwrap(model), input_ids, attention_mask, resp, chunk_size)


class EpochHistory(EMAHistory):
    """The model at the start of the current epoch (``--history epoch``, beyond the paper).

    With the base model as history over several epochs, REL keeps rewarding what epoch 1
    already taught: REL only grows, and the tokens memorized first stay on top. Measured from
    the start of the current epoch, REL is what *this* pass over the data has gained so far.
    In epoch 1 this is the base model exactly (LoRA starts with B = 0; full fine-tuning from
    the loaded weights). One copy of the trainable parameters (the adapter with LoRA).
    """

    def __init__(self, model):
        super().__init__(model, alpha=0.0)
        self.callback = _HistoryCallback(self.ema, update=False)     # no per-step update
        self.epoch = 0                        # the epoch the copy was taken at

    def start_epoch(self, epoch: int) -> None:
        """Called before every training forward: take the copy when a new epoch begins."""
        if epoch != self.epoch:
            self.ema.snapshot()
            self.epoch = epoch
