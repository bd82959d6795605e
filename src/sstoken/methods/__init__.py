"""Token-level methods, one class per file (interface: :mod:`sstoken.methods.base`).

``METHODS`` maps each ``--method`` name to its class; adding a method = a file + one line here.
"""

from __future__ import annotations

from .base import Method, Needs, Selection, Tokens
from .full import Full
from .random import Random
from .rho1 import Rho1
from .sstoken import SsToken
from .tokencleaning import TokenCleaning

METHODS: dict[str, type[Method]] = {m.name: m for m in (Full, Random, Rho1, TokenCleaning, SsToken)}


def get_method(args) -> Method:
    """The method object for a :class:`sstoken.args.SelectionArguments`."""
    return METHODS[args.method](args)


__all__ = ["METHODS", "Method", "Needs", "Selection", "Tokens", "get_method"]
