"""How much each kept token counts: the interface of a token weighting.

A weighting turns per-token tensors of one micro-batch into weights ``w (B, L)``, zero off the
kept tokens, with no gradient. The trainer's loss is then (``docs/design.md``, "Weighting")::

    loss = sum_{i kept} w_i * NLL_i / (number of kept tokens of the whole optimizer step)

plus ``kl_alpha * sum_{i kept} KL_i / N_step`` for a weighting anchored to a reference (ASFT),
so ``--weighting none`` (w = 1) is Eq. 10 unchanged, and a weighting composes with any
selection method (``--method``: which tokens; ``--weighting``: how much). What a weighting
needs from the forward besides the NLL (EAFT: the top-k entropy of each row) is computed
chunk by chunk inside the chunked loss, never from full (tokens x vocab) logits.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class Weighting:
    """Base class and ``none``: every kept token counts 1 (plain SFT, the papers' Eq. 10)."""

    name: ClassVar[str] = "none"
    needs_reference: ClassVar[bool] = False    # a frozen reference's distribution (ASFT)

    def __init__(self, args):
        self.args = args

    @staticmethod
    def check(args) -> list[str]:
        """Problems with the options for this weighting (reported with all others)."""
        return []

    @property
    def topk(self) -> int:
        """Top-k entropy the forward must compute for each row (0 = none)."""
        return 0

    @property
    def kl_alpha(self) -> float:
        """Weight of the per-token KL to the reference added to the loss (ASFT; 0 = none)."""
        return 0.0

    def weights(self, loss: torch.Tensor, entropy: torch.Tensor | None,
                keep: torch.Tensor) -> torch.Tensor:
        """loss (B, L) detached NLL, entropy (B, L) or None, keep (B, L) bool -> w (B, L)."""
        return keep.to(loss.dtype)
