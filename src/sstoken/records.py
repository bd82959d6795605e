"""The per-token selection record: one schema, written by training and read by the report.

Training (:class:`sstoken.trainer.SelectionTrainer`) saves one record per example and method
to ``selection.jsonl`` with :func:`write_scores`; ``sstoken show`` reads it back with
:func:`read_scores`. One record (a JSON object, one per line)::

    {"id": "ex0", "method": "sstoken", "step": 12, "gamma": 0.5, "rho": 0.6,    # SCALAR_FIELDS
     "tokens": ["<s>", "Hello", ...],          # token text, or null (no tokenizer at training)
     "response": [false, true, ...],           # PER_TOKEN_BOOL: trained-on positions,
     "keep": [false, true, ...],               #   kept tokens,
     "by_attention": [false, false, ...],      #   kept mainly because of attention
     "loss": [null, 2.31, ...], "rel": [...],  # PER_TOKEN_NUMERIC: numbers or nulls
     "rel_norm": [...], "attn_score": [...], "score": [...]}

Every per-token list has one entry per token. A new per-token number is one more name in
:data:`PER_TOKEN_NUMERIC`: the checks here, the report's page data and its tooltip all iterate
over that tuple. (The boolean fields are stored on the page as one state letter per token, see
:func:`token_states`; a new boolean would need a new letter there.)

Pure Python: no torch, no matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .io import atomic_write

SCALAR_FIELDS = ("id", "method", "step", "gamma", "rho")
REQUIRED = ("id", "method", "tokens", "response", "keep")
PER_TOKEN_BOOL = ("response", "keep", "by_attention")
PER_TOKEN_NUMERIC = ("loss", "rel", "rel_norm", "attn_score", "attn_norm", "score", "weight")
PER_TOKEN = PER_TOKEN_BOOL + PER_TOKEN_NUMERIC

# Per-token outcome letters (token_states): prompt, response not kept, kept, kept mainly by attention.
PROMPT, DROPPED, KEPT, BY_ATTENTION = "p", "d", "k", "a"


class ReportError(ValueError):
    """Bad scores or report input; the message names the file (and line or record) at fault."""


def finite(x: Any) -> bool:
    """True for a finite int or float (not a bool, not NaN or infinity)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------- check

def check_record(rec: Any, where: str = "record") -> dict:
    """Check one scores record and return it normalized.

    Required: ``id``, ``method``, ``tokens``, ``response``, ``keep``. Optional (null or absent is
    fine): ``step``, ``gamma``, ``rho`` and the per-token lists ``loss``, ``rel``, ``rel_norm``,
    ``attn_score``, ``score``, ``by_attention``. ``id`` and ``method`` become strings; null
    ``tokens`` (no tokenizer at training time) become position placeholders; a missing
    ``by_attention`` is derived as ``keep and (1-gamma)*attn_score > gamma*rel_norm`` when those
    are there, else all False (:func:`derive_by_attention`).
    """
    if not isinstance(rec, dict):
        raise ReportError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise ReportError(f"{where}: missing field(s) {', '.join(missing)}")
    rec = dict(rec, id=str(rec["id"]), method=str(rec["method"]))
    if not isinstance(rec["response"], list):
        raise ReportError(f"{where}: field 'response' must be a list")
    if rec["tokens"] is None:
        rec["tokens"] = [f"\u27e8{i}\u27e9" for i in range(len(rec["response"]))]
    if not isinstance(rec["tokens"], list) or not all(isinstance(t, str) for t in rec["tokens"]):
        raise ReportError(f"{where}: field 'tokens' must be a list of strings")
    n = len(rec["tokens"])
    for k in PER_TOKEN:
        v = rec.get(k)
        if v is None:
            continue
        if not isinstance(v, list):
            raise ReportError(f"{where}: field {k!r} must be a list (or null)")
        if len(v) != n:
            raise ReportError(f"{where}: field {k!r} has {len(v)} values for {n} tokens")
        if k in PER_TOKEN_NUMERIC and not all(x is None or _number(x) for x in v):
            raise ReportError(f"{where}: field {k!r} must hold numbers or nulls")
    for k in SCALAR_FIELDS[2:]:                                   # step, gamma, rho
        if rec.get(k) is not None and not isinstance(rec[k], (int, float)):
            raise ReportError(f"{where}: field {k!r} must be a number or null")
    if rec.get("by_attention") is None:
        rec["by_attention"] = derive_by_attention(rec)
    return rec


def derive_by_attention(rec: Mapping) -> list[bool]:
    """Per token: kept, and ``(1-gamma)*attn > gamma*rel_norm`` (attention outweighed REL in
    the combined score), ``attn`` the normalized attention score (``attn_norm``, with
    ``--normalize rank``) or else ``attn_score``. All False when ``gamma``, ``rel_norm`` or
    the attention score is missing."""
    g, rn = rec.get("gamma"), rec.get("rel_norm")
    a = rec.get("attn_norm") if rec.get("attn_norm") is not None else rec.get("attn_score")
    if g is None or rn is None or a is None:
        return [False] * len(rec["tokens"])
    return [bool(k) and x is not None and y is not None and (1 - g) * y > g * x
            for k, x, y in zip(rec["keep"], rn, a)]


def token_states(rec: Mapping) -> str:
    """One letter per token of a checked record: ``p`` prompt, ``d`` response but not kept,
    ``k`` kept, ``a`` kept mainly because of attention."""
    return "".join(PROMPT if not r else (BY_ATTENTION if k and a else KEPT if k else DROPPED)
                   for r, k, a in zip(rec["response"], rec["keep"], rec["by_attention"]))


# --------------------------------------------------------------------------- files

def read_scores(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """Read and check scores JSONL files (``selection.jsonl`` as written by training).

    Each line is one record (see :func:`check_record`); blank lines are skipped. Raises
    :class:`ReportError` naming ``file:line`` on invalid JSON, a missing field, a per-token list
    whose length differs from ``tokens``, or a value of the wrong type.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ReportError(f"{path}: no such file")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ReportError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
                out.append(check_record(rec, where))
    return out


def write_scores(path: str | os.PathLike, records: Iterable[Mapping]) -> Path:
    """Write ``records`` as scores JSONL (one object per line), atomically; return the path.

    Each record is checked first (:func:`check_record`; :class:`ReportError` names
    ``path: record i``) and written as given, not normalized: null ``tokens`` stay null and a
    missing ``by_attention`` stays missing, so the file is what the trainer saved.
    """
    lines = []
    for i, rec in enumerate(records):
        check_record(rec, f"{path}: record {i}")
        lines.append(json.dumps(dict(rec), ensure_ascii=False) + "\n")
    return atomic_write(path, "".join(lines))


# --------------------------------------------------------------------------- token classes

TOKEN_CLASSES = ("number (first)", "number (later)", "word", "punctuation", "whitespace", "template")


def token_class(text: str, previous: str | None = None) -> str:
    """The class of a response token from its text: ``template`` (a special marker such as
    ``<|im_end|>``), ``number (first)`` / ``number (later)`` (holds a digit; later = the
    token before it also holds one, so it continues a number), ``word`` (holds a letter),
    ``whitespace``, else ``punctuation``."""
    t = text.strip()
    if t.startswith("<") and t.endswith(">") and len(t) > 2 and " " not in t:
        return "template"
    if any(c.isdigit() for c in t):
        later = previous is not None and any(c.isdigit() for c in previous)
        return "number (later)" if later else "number (first)"
    if any(c.isalpha() for c in t):
        return "word"
    return "whitespace" if not t else "punctuation"


def kept_by_class(records: Iterable[Mapping]) -> dict[str, tuple[int, int]]:
    """``{class: (kept, response tokens)}`` over checked records with token text (records
    without tokens are skipped)."""
    out = {c: [0, 0] for c in TOKEN_CLASSES}
    for rec in records:
        toks = rec.get("tokens")
        if toks is None:
            continue
        for i, (r, k) in enumerate(zip(rec["response"], rec["keep"])):
            if r:
                c = out[token_class(toks[i], toks[i - 1] if i else None)]
                c[0] += bool(k)
                c[1] += 1
    return {c: (k, n) for c, (k, n) in out.items()}
