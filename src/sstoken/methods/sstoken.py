"""``sstoken`` (Qin et al., "ssToken: Self-modulated and Semantic-aware Token Selection for LLM
Fine-tuning", ICLR 2026, arXiv:2510.18250). Equations as in ``docs/design.md``:

* Eq. 3   ``REL(i) = loss_history(i) - loss_current(i)`` (what training has already gained)
* Eq. 5-7 ``AttnScore(i)`` = prompt attention mass at ``--attn_layer`` (from the forward)
* Eq. 8   min-max of REL over each sample's R (``--normalize minmax``, the paper), or both
          REL and AttnScore to per-sample percentiles (``--normalize rank``)
* Eq. 9   ``score = gamma * norm(REL) + (1 - gamma) * norm(AttnScore)``
* Eq. 11  keep the top ``ceil(rho * |R|)`` per sample

History (``--history``): ``base`` = the model before SFT (with LoRA the same network with the
adapter disabled; its losses may come from the ``sstoken score`` cache), ``ema`` (Eq. 4) or
``epoch`` (the model at the start of the current epoch), :mod:`sstoken.history`.
``--rel_warmup f``: gamma is treated as 0 for the first fraction f of the steps, while REL
is still noise. ``--attn_sink k``: the attention score leaves the first k keys out (the
trainer passes the sink mask to the attention hook).
"""

from __future__ import annotations

import torch

from ..scoring import (attention_driven, excess_loss, minmax_normalize, percentile_normalize,
                       rank_score, sstoken_score)
from .base import Method, Needs, Selection, Tokens


class SsToken(Method):
    name = "sstoken"

    @staticmethod
    def check(args) -> list[str]:
        out = []
        if args.scope == "pool":
            out.append("--method sstoken takes --scope sample or batch, not pool")
        if args.history in ("ema", "epoch") and args.history_losses not in ("auto", "online"):
            out.append(f"--history {args.history} computes history losses online; "
                       f"--history_losses {args.history_losses} (a base-model cache) does not apply")
        return out

    def gamma(self, step: int, max_steps: int) -> float:
        """gamma, or 0 during the REL warm-up (the first ``rel_warmup`` of the steps)."""
        if self.args.rel_warmup > 0 and max_steps and step < self.args.rel_warmup * max_steps:
            return 0.0
        return self.args.gamma

    def needs(self, step: int, max_steps: int) -> Needs:
        g = self.gamma(step, max_steps)
        return Needs(history=g > 0, attention=g < 1)

    def prepare(self, examples, losses) -> dict:
        """Attach cached base-model losses when the history is the base model and a cache
        entry matches (``auto``) or is named (a folder); otherwise they come online."""
        a = self.args
        if a.gamma == 0 or a.history != "base":
            source = None                                   # no base-model losses needed
        elif a.history_losses == "online":
            source = "online"
        elif a.history_losses == "auto":
            found = losses.attach(losses.model, examples, "history_loss", compute=False)
            source = "cache" if found else "online"
        else:
            source = str(losses.attach_from(a.history_losses, examples, "history_loss"))
        return {"history_losses": source}

    def num_kept(self, resp, batch) -> int:
        return self.num_kept_top(resp)

    def select(self, t: Tokens) -> Selection:
        gamma = self.gamma(t.step, t.max_steps)
        rank = self.args.normalize == "rank"
        record = {}
        if gamma > 0:
            rel = excess_loss(t.history_loss, t.loss, t.resp)                # Eq. 3 (B, L)
            norm = percentile_normalize if rank else minmax_normalize
            rel_norm = norm(rel, t.resp)                                     # Eq. 8 (B, L)
            record.update(rel=rel, rel_norm=rel_norm)
        else:
            rel_norm = torch.zeros_like(t.loss)
        attn = t.attn_score if t.attn_score is not None else torch.zeros_like(t.loss)
        record["attn_score"] = attn
        if rank:
            attn = record["attn_norm"] = percentile_normalize(attn, t.resp)  # (B, L)
        score = (rank_score if rank else sstoken_score)(rel_norm, attn, t.resp, gamma)  # Eq. 9
        keep = self.top(score, t.resp)                                       # Eq. 11
        record.update(score=score, by_attention=attention_driven(rel_norm, attn, gamma) & keep)
        return Selection(keep=keep, record=record, gamma=gamma)
