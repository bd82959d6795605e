"""``random``: keep a uniformly random ``ceil(rho * |R|)`` of each sample's response tokens.

A control for "fewer tokens" alone. Each sample draws from its own generator, seeded by
(``--seed``, epoch, example index), so the choice does not depend on batch composition,
accumulation or the number of processes.
"""

from __future__ import annotations

import torch

from ..scoring import select_random
from .base import Method, Selection, Tokens


class Random(Method):
    name = "random"

    def select(self, t: Tokens) -> Selection:
        gens = [torch.Generator().manual_seed(hash((t.seed, t.epoch, int(i))) & 0x7FFFFFFF)
                for i in t.index.tolist()]
        return Selection(keep=select_random(t.resp, self.rho, gens))
