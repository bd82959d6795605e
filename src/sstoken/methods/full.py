"""``full``: train on every response token. The plain-SFT baseline."""

from __future__ import annotations

import torch

from .base import Method, Selection, Tokens


class Full(Method):
    name = "full"
    adaptive_rho = False                    # keeps everything: no rho to adapt

    def num_kept(self, resp: torch.Tensor, batch: dict) -> int:
        return int(resp.sum())

    def select(self, t: Tokens) -> Selection:
        return Selection(keep=t.resp.clone())
