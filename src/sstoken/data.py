"""Load instruction data, apply a chat template, tokenize, mask the prompt, collate.

Every record becomes a list of messages ``[{"role", "content"}, ...]`` (roles ``system``,
``user``, ``assistant``), rendered with a template, tokenized once, and labelled:
``labels[i] = input_ids[i]`` on assistant tokens (every assistant turn of a multi-turn
sample) and ``-100`` everywhere else (system/user turns, template markers, padding).
This is the set R of ``docs/design.md`` ("The math"); the prompt set P is every other non-pad token.

Accepted record formats (JSON list, JSONL, or a ``datasets`` folder/name):

* ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}`` (tulu)
* ``{"prompt": ..., "completion": ...}``
* ``{"instruction": ..., "input": ..., "output": ...}`` (Alpaca; ``input`` optional)

An optional ``"id"`` field is kept; otherwise the id is a hash of the messages, so cached
per-token values can be matched to an example even if the file is reordered.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .errors import DataError
from .scoring import IGNORE_INDEX
from .sources import BadRecord, Where, read_records, where_text
from .templates import (TEMPLATES, Region, char_weights, render_chat_template,  # noqa: F401 - re-exported
                        render_tulu, tokenize_messages)

ROLES = ("system", "user", "assistant")
DATA_WEIGHT = "data_weight"      # Example.extra: per-token training weights given in the data


@dataclass
class Example:
    """One tokenized sample. ``extra`` holds per-token side data aligned with ``input_ids``
    (cached history/reference losses ``(L,)``, a precomputed keep mask ``(L,)``)."""

    id: str
    input_ids: list[int]
    labels: list[int]
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def num_response_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class LoadStats:
    records: int = 0
    invalid: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    examples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    skipped: list[dict] = field(default_factory=list)   # {"file", "line" or "record", "reason"}

    @property
    def invalid_reasons(self) -> list[str]:
        return [f"{where_text(s)}: {s['reason']}" for s in self.skipped]

    def summary(self) -> str:
        s = (f"{self.examples} examples from {self.records} records "
             f"({self.tokens} tokens, {self.response_tokens} response tokens); "
             f"{self.truncated} truncated, {self.dropped_no_response} dropped with no response "
             f"tokens left, {self.invalid} invalid skipped")
        return s


# --------------------------------------------------------------------------- reading files

def to_messages(rec: Any, where: str) -> list[dict[str, str]]:
    """Normalize one record to a list of ``{"role", "content"}`` messages, or raise DataError."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")

    def text(key: str, value: Any, required: bool = True) -> str:
        if value is None:
            if required:
                raise DataError(f"{where}: field {key!r} is missing")
            return ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        if required and not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        return value

    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{k}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{k}] has role {m['role']!r}; expected one of {ROLES}")
            msg = {"role": m["role"], "content": text(f"messages[{k}].content", m["content"])}
            msg.update(_message_weights(m, msg["content"], f"{where}: messages[{k}]"))
            out.append(msg)
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: no assistant message to train on")
        if out[0]["role"] == "assistant":
            raise DataError(f"{where}: the first message is from the assistant; a prompt must come first")
        return out
    if "prompt" in rec or "completion" in rec:
        return [{"role": "user", "content": text("prompt", rec.get("prompt"))},
                {"role": "assistant", "content": text("completion", rec.get("completion"))}]
    if "instruction" in rec or "output" in rec:
        instr = text("instruction", rec.get("instruction"))
        inp = text("input", rec.get("input"), required=False)
        user = instr if not inp.strip() else f"{instr}\n\n{inp}"
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": text("output", rec.get("output"))}]
    raise DataError(f"{where}: unknown record format (keys {sorted(rec)}); expected 'messages', "
                    "'prompt'/'completion' or 'instruction'/'input'/'output'")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _message_weights(m: dict, content: str, where: str) -> dict:
    """A message's optional ``"weight"`` (a number >= 0) and ``"spans"`` (a list of
    ``{"start", "end", "weight"}`` over character offsets of its content, 0 <= start < end <=
    len(content), not overlapping), checked; ``{}`` when it has neither."""
    out = {}
    if "weight" in m:
        w = m["weight"]
        if not _number(w) or w < 0:
            raise DataError(f"{where}.weight must be a number >= 0, got {w!r}")
        out["weight"] = float(w)
    if "spans" in m:
        spans = m["spans"]
        if not isinstance(spans, list):
            raise DataError(f"{where}.spans must be a list of {{\"start\", \"end\", \"weight\"}}")
        checked = []
        for j, sp in enumerate(spans):
            at = f"{where}.spans[{j}]"
            if not isinstance(sp, dict) or set(sp) != {"start", "end", "weight"}:
                raise DataError(f"{at} must be an object with exactly start, end and weight")
            a, b, w = sp["start"], sp["end"], sp["weight"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)):
                raise DataError(f"{at}: start and end must be integers (character offsets)")
            if not 0 <= a < b <= len(content):
                raise DataError(f"{at}: [{a}, {b}) is out of range for a content of {len(content)} "
                                "characters (0 <= start < end <= length)")
            if not _number(w) or w < 0:
                raise DataError(f"{at}.weight must be a number >= 0, got {w!r}")
            checked.append((a, b, float(w)))
        checked.sort()
        for (a1, b1, _), (a2, b2, _) in zip(checked, checked[1:]):
            if a2 < b1:
                raise DataError(f"{where}.spans: [{a1}, {b1}) and [{a2}, {b2}) overlap")
        out["spans"] = checked
    return out


def example_id(rec: Any, messages: list[dict[str, str]]) -> str:
    """The record's own ``id`` if it has one, else a content hash of its messages."""
    if isinstance(rec, dict) and rec.get("id") not in (None, ""):
        return str(rec["id"])
    blob = json.dumps(messages, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha1(blob).hexdigest()[:16]


def build_examples(records: Iterable[tuple[str, Any]], tokenizer, *, template: str = "tulu",
                   max_seq_length: int = 2048, skip_invalid: bool = False,
                   limit: int | None = None) -> tuple[list[Example], LoadStats]:
    """Records -> tokenized, labelled, truncated examples, with counts of what was dropped."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("sstoken needs a fast tokenizer (offset mapping) to mask prompts exactly")
    from .progress import progress

    stats, examples, seen = LoadStats(), [], {}
    for where, rec in progress(records, desc="tokenizing", unit="rec", total=limit):
        if limit is not None and stats.examples >= limit:
            break
        stats.records += 1
        try:
            if isinstance(rec, BadRecord):
                raise DataError(f"{where}: {rec.reason}")
            messages = to_messages(rec, where)
            try:
                input_ids, labels, weights = tokenize_messages(messages, tokenizer, template)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        except DataError as e:
            if not skip_invalid:
                raise
            stats.invalid += 1
            w = where if isinstance(where, Where) else Where(where)
            stats.skipped.append({"file": w.file, "line": w.line, "record": w.record,
                                  "reason": str(e).removeprefix(f"{where}: ")})
            continue
        if len(input_ids) > max_seq_length:
            stats.truncated += 1
            input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
            weights = weights[:max_seq_length] if weights is not None else None
        if all(x == IGNORE_INDEX for x in labels):
            stats.dropped_no_response += 1
            continue
        eid = example_id(rec, messages)
        if eid in seen:  # identical samples keep distinct, stable ids by occurrence
            seen[eid] += 1
            eid = f"{eid}#{seen[eid]}"
        else:
            seen[eid] = 0
        ex = Example(eid, input_ids, labels)
        if weights is not None:
            ex.extra[DATA_WEIGHT] = weights
        examples.append(ex)
        stats.examples += 1
        stats.tokens += len(input_ids)
        stats.response_tokens += ex.num_response_tokens
    if any(DATA_WEIGHT in e.extra for e in examples):     # one batch needs the field for all
        for e in examples:
            e.extra.setdefault(DATA_WEIGHT, [0.0 if x == IGNORE_INDEX else 1.0 for x in e.labels])
    return examples, stats


def load_examples(source: str, tokenizer, *, template: str = "tulu", max_seq_length: int = 2048,
                  skip_invalid: bool = False, limit: int | None = None, split: str = "train",
                  skip: int = 0) -> tuple[list[Example], LoadStats]:
    """Read ``source`` (file, folder, dataset name or ``embedded:gsm8k``) into examples,
    skipping the first ``skip`` records."""
    if source.startswith("embedded:"):
        from .embedded import embedded_records

        records = embedded_records(source.split(":", 1)[1])
    else:
        records = read_records(source, split=split)
    if skip:
        import itertools

        records = itertools.islice(records, skip, None)
    return build_examples(records, tokenizer, template=template, max_seq_length=max_seq_length,
                          skip_invalid=skip_invalid, limit=limit)


# --------------------------------------------------------------------------- batching

class ExampleDataset(torch.utils.data.Dataset):
    """A list of :class:`Example` as a map-style dataset of dicts (with the example index)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        return {"index": i, "input_ids": ex.input_ids, "labels": ex.labels, **ex.extra}


@dataclass
class Collator:
    """Right-pad a list of examples to the longest (optionally a multiple of ``pad_to_multiple_of``).

    Returns ``input_ids (B, L)``, ``attention_mask (B, L)``, ``labels (B, L)`` (-100 on pad),
    ``index (B,)`` and each per-token extra field ``(B, L)`` float32 padded with 0.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        L = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            L = (L + m - 1) // m * m
        B = len(features)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        extra_keys = [k for k in features[0] if k not in ("index", "input_ids", "labels")]
        extras = {k: torch.zeros((B, L), dtype=torch.float32) for k in extra_keys}
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[b, :n] = torch.tensor(f["input_ids"])
            labels[b, :n] = torch.tensor(f["labels"])
            attention_mask[b, :n] = 1
            for k in extra_keys:
                extras[k][b, :n] = torch.as_tensor(f[k], dtype=torch.float32)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "index": torch.tensor([f["index"] for f in features], dtype=torch.long)}
        out.update(extras)
        return out
