"""Chat templates: render a sample's messages to text, find where each message went, and turn
that into tokens, labels (R) and, when the data carries them, per-token weights.

* ``tulu`` - the paper's ``<|user|>`` / ``<|assistant|>`` template (:func:`render_tulu`).
* ``chat`` - the tokenizer's own chat template (:func:`render_chat_template`).

A token belongs to R when the character its first character is has a training weight > 0:
an assistant turn's text (content, end-of-turn marker, newline) weighs 1 unless the message
says otherwise (``"weight"``, ``"spans"``), anything else 0 (``docs/design.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError
from .scoring import IGNORE_INDEX

TEMPLATES = ("tulu", "chat")


@dataclass
class Region:
    """Where message k sits in the rendered text: its content at ``[start, end)`` (after the
    template's own stripping, which drops ``offset`` leading characters of the given content),
    and, for a trained turn, the whole trained text ``[train_start, train_end)`` (an assistant
    turn's content plus the template's end-of-turn text)."""

    start: int
    end: int
    offset: int = 0
    train_start: int | None = None
    train_end: int | None = None


def render_tulu(messages: list[dict[str, str]], eos_token: str) -> tuple[str, list[Region]]:
    """The tulu template (open-instruct, used by the paper) and where each message went.

    ``<|system|>\\n{c}\\n`` / ``<|user|>\\n{c}\\n`` / ``<|assistant|>\\n{c}{eos}\\n``; the trained
    text of an assistant turn is its content, the eos and the newline after it.
    """
    text, regions = "", []
    for m in messages:
        content = m["content"].strip()
        offset = len(m["content"]) - len(m["content"].lstrip())
        text += f"<|{m['role']}|>\n"
        start = len(text)
        text += content
        end = len(text)
        if m["role"] == "assistant":
            text += eos_token + "\n"
            regions.append(Region(start, end, offset, start, len(text)))
        else:
            text += "\n"
            regions.append(Region(start, end, offset))
    return text, regions


def render_chat_template(messages: list[dict[str, str]], tokenizer) -> tuple[str, list[Region]]:
    """The tokenizer's own chat template; each turn found by rendering prefixes.

    For assistant turn k, ``render(messages[:k], add_generation_prompt=True)`` must be a prefix
    of ``render(messages[:k+1])``; the text between them is trained. Templates that rewrite
    earlier turns (so the prefix property fails) are rejected with an error. Where a message's
    content starts (for weights and spans) is found by rendering the same turn with a marker
    in place of its content, so a role header that happens to contain the content's text is
    never mistaken for it.
    """
    import jinja2

    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except jinja2.TemplateError as e:
            raise DataError(f"the tokenizer's chat template fails on this record ({e})") from None

    full = render(messages, False)
    regions = []
    marker = "\u2063sstoken-content\u2063"
    for k, m in enumerate(messages):
        upto = render(messages[: k + 1], False)
        if not full.startswith(upto):
            raise DataError("the tokenizer's chat template is not prefix-consistent; use --template tulu")
        at = render(messages[:k] + [dict(m, content=marker)], False).find(marker)
        content, offset = m["content"], 0
        if at >= 0 and not full.startswith(content, at):          # a template that strips it
            offset = len(content) - len(content.lstrip())
            content = content.strip()
        start, end = (at, at + len(content)) if at >= 0 and full.startswith(content, at) else (None, None)
        region = Region(start, end, offset)
        if m["role"] == "assistant":
            before = render(messages[:k], True)
            if not upto.startswith(before):
                raise DataError("the tokenizer's chat template is not prefix-consistent; use --template tulu")
            region.train_start, region.train_end = len(before), len(upto)
        regions.append(region)
    return full, regions


def char_weights(messages: list[dict], regions: list[Region], n: int) -> list[float]:
    """The training weight of every character of the rendered text (length ``n``): an
    assistant turn's trained text 1, or its ``"weight"``; another message's content 0, or its
    ``"weight"``; a span inside a message's content its own weight; everything else 0."""
    w = [0.0] * n
    for m, r in zip(messages, regions):
        default = m.get("weight", 1.0 if m["role"] == "assistant" else 0.0)
        if r.train_start is not None:
            w[r.train_start:r.train_end] = [default] * (r.train_end - r.train_start)
        elif "weight" in m:
            if r.start is None:
                raise DataError("the chat template changes the message text, so its weight cannot "
                                "be placed; use --template tulu")
            w[r.start:r.end] = [default] * (r.end - r.start)
        for sp in m.get("spans", ()):
            a, b, sw = (sp["start"], sp["end"], sp["weight"]) if isinstance(sp, dict) else sp
            if r.start is None:
                raise DataError("the chat template changes the message text, so its spans cannot "
                                "be placed; use --template tulu")
            a, b = max(a - r.offset, 0), min(b - r.offset, r.end - r.start)
            w[r.start + a:r.start + b] = [sw] * max(b - a, 0)
    return w


def tokenize_messages(messages: list[dict], tokenizer, template: str = "tulu",
                      ) -> tuple[list[int], list[int], list[float] | None]:
    """Render, tokenize and label one sample: ``(input_ids, labels, weights)``, labels -100
    off R; ``weights`` (the per-token training weight from the data) is None unless a message
    carries ``"weight"`` or ``"spans"``.

    A token takes the weight of the character its first character is (needs a fast
    tokenizer's offset mapping); it is in R when that weight is > 0. Without weights in the
    data, that is: a token belongs to R when its first character lies inside an assistant
    turn's trained text. Special tokens added by the tokenizer (e.g. BOS) have empty offsets
    and stay masked.
    """
    if template == "tulu":
        text, regions = render_tulu(messages, tokenizer.eos_token or "")
        add_special = True
    elif template == "chat":
        text, regions = render_chat_template(messages, tokenizer)
        add_special = False
    else:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    cw = char_weights(messages, regions, len(text))
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    weights = [cw[s] if e > s else 0.0 for s, e in enc["offset_mapping"]]
    if weights:
        weights[0] = 0.0                  # nothing predicts the first token
    labels = [tok if w > 0 else IGNORE_INDEX for tok, w in zip(input_ids, weights)]
    weighted = any("weight" in m or "spans" in m for m in messages)
    return input_ids, labels, (weights if weighted else None)
