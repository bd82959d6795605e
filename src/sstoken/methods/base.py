"""The interface every token-level method implements, in one small class per file.

A method answers three questions, in the order training asks them:

1. **Before training** - :meth:`Method.prepare`: attach what the method needs to each
   example, computed once over the data (cached per-token losses of a reference or history
   model, a precomputed keep mask). :meth:`Method.check` refuses impossible options before
   anything loads.
2. **Before each forward** - :meth:`Method.needs`: does this step need the history model's
   losses (an extra no-grad forward unless they are cached) or the attention score (captured
   inside the training forward)? :meth:`Method.num_kept`: how many tokens this micro-batch
   will keep, known from the labels alone, so the loss can be normalized over the whole
   optimizer step (Eq. 10).
3. **After the forward** - :meth:`Method.select`: the keep mask from per-token tensors
   (:class:`Tokens`), and the per-token values to record (names from
   :data:`sstoken.records.PER_TOKEN`).

Adding a method = one file here with one subclass, registered in ``methods/__init__.py``,
plus its tests and its README paragraph. The trainer never branches on a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..scoring import num_keep, select_top_flat, select_top_per_sample

if TYPE_CHECKING:
    from ..args import SelectionArguments
    from ..data import Example
    from ..losses import LossProvider


@dataclass(frozen=True)
class Needs:
    """What one training step needs besides the training forward."""

    history: bool = False      # loss_history (B, L): from the cache, else an online forward
    attention: bool = False    # attn_score (B, L) at --attn_layer, from the training forward


@dataclass
class Tokens:
    """Per-token tensors of one micro-batch, all (B, L) and zero off R unless stated."""

    resp: torch.Tensor                          # bool, R (scoring.response_mask)
    loss: torch.Tensor                          # current model's NLL, detached
    index: torch.Tensor                         # (B,) example index in the dataset
    step: int = 0                               # optimizer steps done
    max_steps: int = 0                          # of the whole run (0 = unknown)
    epoch: int = 0
    seed: int = 0
    history_loss: torch.Tensor | None = None    # history model's NLL (sstoken)
    ref_loss: torch.Tensor | None = None        # reference model's NLL (rho1)
    keep: torch.Tensor | None = None            # precomputed keep, 1.0 / 0.0 (tokencleaning)
    attn_score: torch.Tensor | None = None      # prompt attention mass (sstoken)


@dataclass
class Selection:
    """A method's answer: the keep mask and what to record for ``sstoken show``."""

    keep: torch.Tensor                                        # (B, L) bool, a subset of R
    record: dict[str, torch.Tensor] = field(default_factory=dict)   # per-token fields (B, L)
    gamma: float | None = None                                # the ssToken gamma this step used
    weight: torch.Tensor | None = None                        # (B, L) the weighting's w, set by the trainer
    kl: torch.Tensor | None = None                            # (B, L) KL to a reference (ASFT), with grad


class Method:
    """Base class: keep every response token (``full``). Subclasses override what differs."""

    name: ClassVar[str] = "full"
    default_scope: ClassVar[str] = "sample"
    adaptive_rho: ClassVar[bool] = True     # --rho_rule unlearned may set rho before each step

    def __init__(self, args: SelectionArguments):
        self.args = args
        self.rho = args.rho                 # this step's kept fraction (--rho, or --rho_rule's)

    @staticmethod
    def check(args: SelectionArguments) -> list[str]:
        """Problems with the options for this method (reported with all other problems)."""
        return []

    def prepare(self, examples: list[Example], losses: LossProvider) -> dict:
        """Attach per-example side data before training; returns facts for the run summary."""
        return {}

    def needs(self, step: int, max_steps: int) -> Needs:
        return Needs()

    def num_kept(self, resp: torch.Tensor, batch: dict) -> int:
        """Tokens this micro-batch keeps, from the labels alone (before the forward)."""
        return int(num_keep(resp.sum(dim=1), self.rho).sum())

    def select(self, t: Tokens) -> Selection:
        raise NotImplementedError

    # shared by the scoring methods
    def top(self, score: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
        """Keep the top ``ceil(rho * |R|)`` per sample (Eq. 11) or per micro-batch (scope batch)."""
        if self.args.scope == "batch":
            return select_top_flat(score, resp, int(num_keep(int(resp.sum()), self.rho)))
        return select_top_per_sample(score, resp, self.rho)

    def num_kept_top(self, resp: torch.Tensor) -> int:
        if self.args.scope == "batch":
            return int(num_keep(int(resp.sum()), self.rho))
        return int(num_keep(resp.sum(dim=1), self.rho).sum())
