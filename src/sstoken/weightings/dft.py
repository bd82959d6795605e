"""``dft`` - Dynamic Fine-Tuning (Wu et al., "On the Generalization of SFT: A Reinforcement
Learning Perspective with Reward Rectification", 2025, arXiv:2508.05629).

Each kept token's NLL is multiplied by its probability with the gradient stopped,
``w = sg(p(x_i))`` (:func:`sstoken.scoring.dft_weight`), optionally floored at
``--dft_min_weight`` (the authors' advice for long data, where products of small
probabilities otherwise silence whole answers). Needs nothing beyond the NLL itself.
"""

from __future__ import annotations

from ..scoring import dft_weight
from .base import Weighting


class DFT(Weighting):
    name = "dft"

    @staticmethod
    def check(args) -> list[str]:
        return [] if 0 <= args.dft_min_weight <= 1 else \
            [f"--dft_min_weight must be in [0, 1], got {args.dft_min_weight}"]

    def weights(self, loss, entropy, keep):
        return dft_weight(loss, self.args.dft_min_weight) * keep
