"""``tokencleaning`` (Pang et al., "Token Cleaning: Fine-Grained Data Selection for LLM
Supervised Fine-Tuning", 2025).

* ``--tc_mode fixed``: ``score(i) = loss_base(i) - loss_reference(i)``, computed offline from
  two cached scoring passes; keep the top ``floor(rho * N)`` over **all** N response tokens of
  the pool (``--scope pool``, default; ties by file order then position) or
  ``ceil(rho * |R|)`` per sample (``--scope sample``). The data stays in file order, as in
  the official code. The keep mask is fixed before training: :meth:`TokenCleaning.select`
  only reads it.
* ``--tc_mode self_evolving``: the pool is cut into ``--tc_partitions`` contiguous
  partitions; round 0 trains on partition 0 with every token; round t scores partition t by
  ``loss_base - loss_model(t-1)`` and keeps the global top ``floor(rho * N_t)`` of it
  (:func:`pool_keep` again), continuing to train the same model
  (:func:`sstoken.runs.train_self_evolving`).
"""

from __future__ import annotations

import math

import torch

from ..scoring import response_mask, select_top_flat, select_top_per_sample
from .base import Method, Selection, Tokens


def pool_keep(examples, rho: float, scope: str, base_field: str = "base_loss",
              ref_field: str = "ref_loss") -> None:
    """Write ``example.extra["keep"]`` (1.0 / 0.0 per token) from ``base - ref`` losses: the top
    ``floor(rho * N)`` of the whole pool (scope ``pool``) or the top ``ceil(rho * |R|)`` of each
    sample (scope ``sample``). The two loss fields are dropped afterwards."""
    if not examples:
        return
    L = max(len(e.input_ids) for e in examples)
    labels = torch.full((len(examples), L), -100, dtype=torch.long)
    score = torch.zeros(len(examples), L, dtype=torch.float64)                    # (B, L)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        score[b, :n] = torch.tensor(e.extra[base_field], dtype=torch.float64) - \
            torch.tensor(e.extra[ref_field], dtype=torch.float64)
    mask = response_mask(labels)                                                  # (B, L)
    if scope == "pool":
        keep = select_top_flat(score, mask, math.floor(round(rho * int(mask.sum()), 9)))
    else:
        keep = select_top_per_sample(score, mask, rho)
    for b, e in enumerate(examples):
        e.extra["keep"] = keep[b, :len(e.input_ids)].float().tolist()
        e.extra.pop(base_field, None)
        e.extra.pop(ref_field, None)


class TokenCleaning(Method):
    name = "tokencleaning"
    adaptive_rho = False                    # the keep mask is fixed before training
    default_scope = "pool"

    @property
    def self_evolving(self) -> bool:
        return self.args.tc_mode == "self_evolving"

    @staticmethod
    def check(args) -> list[str]:
        out = []
        if args.tc_mode == "fixed" and not args.ref_model:
            out.append("--method tokencleaning --tc_mode fixed needs --ref_model (or use "
                       "--tc_mode self_evolving, which needs none)")
        if args.scope == "batch":
            out.append("--method tokencleaning takes --scope pool or sample, not batch")
        return out

    def prepare(self, examples, losses) -> dict:
        losses.attach(losses.model, examples, "base_loss")
        if not self.self_evolving:
            losses.attach(self.args.ref_model, examples, "ref_loss")
            pool_keep(examples, self.args.rho, self.args.scope)
        return {}

    def num_kept(self, resp, batch) -> int:
        return int((batch["keep"].bool() & resp).sum())

    def select(self, t: Tokens) -> Selection:
        return Selection(keep=t.keep.bool() & t.resp)
