"""Per-token losses of a model over a dataset, with no gradient (the scoring pass), and the
cache that keeps them.

:func:`compute_losses` scores examples (reference / history models, the held-out loss);
:class:`LossProvider` is what a method's ``prepare`` asks for a model's losses: from the cache
(:mod:`sstoken.cache`) when an entry matches, else computed once and cached.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import cache as cache_mod
from .data import Collator, Example, ExampleDataset
from .io import locked, log
from .modeling import forward_token_losses
from .progress import progress
from .scoring import response_mask


@torch.no_grad()
def compute_losses(model, examples: list[Example], pad_token_id: int, *, batch_size: int = 8,
                   chunk_size: int = 1024, desc: str = "scoring") -> list[torch.Tensor]:
    """Per-token losses ``(L_k,)`` of every example under ``model`` (no grad, eval mode).

    Batches are formed from length-sorted examples so little compute is spent on padding.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda k: len(examples[k].input_ids))
    collate = Collator(pad_token_id)
    out: list[torch.Tensor | None] = [None] * len(examples)
    ds = ExampleDataset([Example(e.id, e.input_ids, e.labels) for e in examples])
    bar = progress(total=sum(len(e.input_ids) for e in examples), desc=desc, unit="tok")
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([ds[k] for k in idx])
        ids = batch["input_ids"].to(device)
        am = batch["attention_mask"].to(device)
        resp = response_mask(batch["labels"].to(device))
        losses = forward_token_losses(model, ids, am, resp, chunk_size).cpu()
        for b, k in enumerate(idx):
            out[k] = losses[b, :len(examples[k].input_ids)].clone()
        bar.update(int(am.sum()))
    bar.close()
    return out  # type: ignore[return-value]


class LossProvider:
    """Cached per-token losses of any model over one tokenized dataset.

    ``model`` is the run's base model (what ``losses.model`` means to a method); the other
    arguments are the data and model options that key the cache (template, max length) and
    load a model to score with (dtype, attention kernel, chunk size).
    """

    def __init__(self, model_args, data_args, batch_size: int = 8, module=None):
        from .embedded import cache_dir

        self.model = model_args.model
        self.module = module          # the base model in memory, when it has no folder to load
        self.model_args, self.data_args = model_args, data_args
        self.root = Path(data_args.cache_dir) if data_args.cache_dir else cache_dir()
        self.batch_size = batch_size

    def key(self, model_name: str, examples: list[Example]) -> tuple[str, str]:
        from .embedded import resolve_model

        fp = cache_mod.model_fingerprint(resolve_model(model_name))
        return fp, cache_mod.cache_key(fp, examples, self.data_args.template,
                                       self.data_args.max_seq_length, self.dtype,
                                       self.model_args.attn_implementation)

    @property
    def dtype(self) -> str:
        """The dtype losses are computed in (``auto`` resolved on this machine)."""
        from .modeling import pick_dtype

        return str(pick_dtype(self.model_args.dtype)).removeprefix("torch.")

    def attach(self, model_name: str, examples: list[Example], field: str,
               compute: bool = True) -> Path | None:
        """Put ``model_name``'s losses into ``example.extra[field]``, computing and caching them
        first when no entry matches and ``compute``. Returns the entry's folder, or None when
        it is absent and ``compute`` is False. A base model that exists only in memory
        (``module``, no folder) is scored directly and not cached."""
        if model_name == self.model and self.module is not None and \
                not (model_name and Path(model_name).is_dir()):
            if not compute:
                return None
            device = next(self.module.parameters()).device
            was = self.module.training
            losses = compute_losses(self.module.to(device), examples, self._pad_id(), batch_size=self.batch_size,
                                    chunk_size=self.model_args.loss_chunk_size, desc="scoring the base model")
            self.module.train(was)
            for e, l in zip(examples, losses):
                e.extra[field] = l.tolist()
            return None
        fp, key = self.key(model_name, examples)
        found = cache_mod.find(self.root, key)
        if found is None and compute:
            # one process scores, every other (rank, parallel run) waits and reads its entry
            with locked(cache_mod.entry_dir(self.root, key)):
                found = cache_mod.find(self.root, key)
                if found is None:
                    self._score(model_name, examples, fp, key)
                    found = cache_mod.find(self.root, key)
        elif found is not None:
            log(f"using cached losses of {model_name}: {found.path}")
        if found is None:
            return None
        found.attach(examples, field)
        return found.path

    def _pad_id(self) -> int:
        cfg = getattr(self.module, "config", None)
        pad = getattr(cfg, "pad_token_id", None)
        return 0 if pad is None else int(pad)          # padding is masked: any id will do

    def _score(self, model_name: str, examples: list[Example], fp: str, key: str) -> None:
        """Score ``examples`` with ``model_name`` and write the cache entry ``key``."""
        from .embedded import resolve_model
        from .modeling import load_model, load_tokenizer, whole_model_loading

        log(f"scoring {len(examples)} examples with {model_name} (cached for later runs)")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        m = self.model_args
        with whole_model_loading():                     # one rank scores, the others wait
            model = load_model(model_name, m.dtype, m.attn_implementation).to(device)
        tok = load_tokenizer(model_name)
        t0 = time.time()
        losses = compute_losses(model, examples, tok.pad_token_id, batch_size=self.batch_size,
                                chunk_size=m.loss_chunk_size,
                                desc=f"scoring {Path(resolve_model(model_name)).name}")
        meta = {"model": model_name, "model_fingerprint": fp, "data": self.data_args.data,
                "template": self.data_args.template, "max_seq_length": self.data_args.max_seq_length,
                "dtype": self.dtype, "attn_implementation": m.attn_implementation,
                "seconds": round(time.time() - t0, 1)}
        cache_mod.write(self.root, key, meta, examples, losses)

    def attach_from(self, folder: str, examples: list[Example], field: str) -> Path:
        """Losses from a cache folder named explicitly: it must belong to this run's base
        model, template and max length, and hold every example as tokenized now."""
        from .embedded import resolve_model

        c = cache_mod.read(Path(folder))
        cache_mod.check_meta(c, cache_mod.model_fingerprint(resolve_model(self.model)),
                             self.data_args.template, self.data_args.max_seq_length, self.dtype)
        c.attach(examples, field)
        return c.path
