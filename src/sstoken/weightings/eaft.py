"""``eaft`` - Entropy-Adaptive Fine-Tuning ("Resolving Confident Conflicts to Mitigate
Forgetting", arXiv:2601.02151).

Each kept token's NLL is multiplied by ``(H_k / 3) ** alpha`` (:func:`sstoken.scoring.eaft_weight`),
``H_k`` the entropy of the softmax over the top ``--eaft_k`` logits (20) of the prediction,
as the reference implementation (LLaMA-Factory ``use_eaft_loss``) computes it: tokens the
model is already confident about count little. The entropy is computed inside the chunked
loss, from the same logits as the NLL.
"""

from __future__ import annotations

from ..scoring import eaft_weight
from .base import Weighting


class EAFT(Weighting):
    name = "eaft"

    @staticmethod
    def check(args) -> list[str]:
        out = []
        if args.eaft_alpha <= 0:
            out.append(f"--eaft_alpha must be > 0, got {args.eaft_alpha}")
        if args.eaft_k < 2:
            out.append(f"--eaft_k must be >= 2, got {args.eaft_k}")
        return out

    @property
    def topk(self) -> int:
        return self.args.eaft_k

    def weights(self, loss, entropy, keep):
        return eaft_weight(entropy, self.args.eaft_alpha) * keep
