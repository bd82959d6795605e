"""Building blocks of the option dataclasses: a field with help text, and a collector of
problems so that one ``__post_init__`` reports all of them."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from ..errors import UsageError

TEMPLATES = ("tulu", "chat")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FINETUNE = ("lora", "full")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _h(text: str, default: Any = None, **kw) -> Any:
    """A field whose help text (``--help``) is ``text``."""
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": text, **kw})
    return field(default=default, metadata={"help": text, **kw})


class Checks:
    """Collects problems so that one run of ``__post_init__`` reports all of them."""

    def __init__(self):
        self.problems: list[str] = []

    def __call__(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def choice(self, name: str, value: Any, allowed) -> None:
        self(value in allowed, f"--{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")

    def done(self) -> None:
        if self.problems:
            raise UsageError(self.problems)
