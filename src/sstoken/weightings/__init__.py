"""Token weightings, one class per file (interface: :mod:`sstoken.weightings.base`).

``WEIGHTINGS`` maps each ``--weighting`` name to its class; a weighting composes with any
selection method.
"""

from __future__ import annotations

from .asft import ASFT
from .base import Weighting
from .dft import DFT
from .eaft import EAFT

WEIGHTINGS: dict[str, type[Weighting]] = {w.name: w for w in (Weighting, DFT, EAFT, ASFT)}


def get_weighting(args) -> Weighting:
    """The weighting object for a :class:`sstoken.args.SelectionArguments`."""
    return WEIGHTINGS[args.weighting](args)


__all__ = ["WEIGHTINGS", "Weighting", "get_weighting"]
