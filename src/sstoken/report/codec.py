"""The report page's data: records packed compactly for the browser, and unpacked again.

Page data (``<script type="application/json" id="sstoken-data">``), stored once and decoded
lazily in the browser, 20 examples per page::

    {"format": 2,
     "fields": [["loss", "loss"], ["rel", "REL"], ...],   # records.PER_TOKEN_NUMERIC, with the
                                                          # tooltip label of each
     "vocab": [token text, ...],           # every distinct token string, once
     "w": 2,                               # digits per token index in a sequence
     "seqs": ["0a0b...", ...],             # distinct token sequences, as packed vocab indices
     "runs": [{"id", "method", "step", "gamma", "rho",
               "seq": 0,                   # index into seqs
               "state": "ppdkka...",       # per position: p prompt, d not kept, k kept,
                                           # a kept mainly because of attention
               "v": {"loss": {"o": -12, "w": 2, "s": "..."}, ...}}]}   # response positions only

Numbers are packed as fixed-width base-64 digits (alphabet ``_ALPHABET``): a value ``x`` is
stored as ``round(1000 x) - o`` in ``w`` digits and the largest code (``64**w - 1``) means null.
Thousandths are what the tooltip shows (3 decimals). This keeps 1,000 examples of 200 tokens
near 2 MB; :func:`decode` turns the data back into records.

The per-token numbers are those of :data:`sstoken.records.PER_TOKEN_NUMERIC`, in that order; the
page's script reads them (and their labels) from ``fields``, so a new one needs no change here
or there (its label is its name unless :data:`LABELS` says otherwise).
"""

from __future__ import annotations

import string

from .. import records as schema
from ..records import SCALAR_FIELDS, finite, token_states

# Tooltip label and longer description (the page's legend hint) of a per-token number; a field
# not listed here is shown under its own name.
LABELS = {"loss": ("loss", "loss"), "rel": ("REL", "REL"), "rel_norm": ("norm REL", "normalized REL"),
          "attn_score": ("attention", "attention score"),
          "attn_norm": ("norm attn", "attention score as a percentile (--normalize rank)"),
          "score": ("score", "combined score"),
          "weight": ("weight", "token weight (--weighting)")}


def label(field: str) -> str:
    """The tooltip label of a per-token number."""
    return LABELS.get(field, (field, field))[0]


def description(field: str) -> str:
    """The longer name of a per-token number (the page's legend hint)."""
    return LABELS.get(field, (field, field))[1]


_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase + "-_"   # 64 digits
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]                               # 4096 codes
_DIGIT = {c: i for i, c in enumerate(_ALPHABET)}


def _code(x: int, w: int) -> str:
    """``x`` (0 <= x < 64**w) as ``w`` base-64 digits, most significant first."""
    if w == 1:
        return _ALPHABET[x]
    if w == 2:
        return _PAIRS[x]
    return _code(x >> 12, w - 2) + _PAIRS[x & 4095]


def _width(largest: int) -> int:
    """Digits needed to store 0..largest and still keep 64**w - 1 free (the null code)."""
    w = 1
    while 64 ** w - 1 <= largest:
        w += 1
    return w


def _unpack(s: str, w: int) -> list[int]:
    out = []
    for i in range(0, len(s), w):
        x = 0
        for c in s[i:i + w]:
            x = x * 64 + _DIGIT[c]
        out.append(x)
    return out


def _pack_values(vals: list) -> dict | None:
    """Floats (or None) as thousandths, offset by the smallest, fixed width; None if all null."""
    q = [max(-10**12, min(10**12, round(v * 1000))) if finite(v) else None for v in vals]
    present = [x for x in q if x is not None]
    if not present:
        return None
    lo = min(present)
    w = _width(max(present) - lo)
    null = 64 ** w - 1
    return {"o": lo, "w": w, "s": "".join(_code(null if x is None else x - lo, w) for x in q)}


def _unpack_values(f: dict) -> list[float | None]:
    null = 64 ** f["w"] - 1
    return [None if x == null else (x + f["o"]) / 1000 for x in _unpack(f["s"], f["w"])]


def encode(records: list[dict]) -> dict:
    """The page's data for checked records (format in the module docstring)."""
    vocab: dict[str, int] = {}
    seqs: dict[tuple, int] = {}
    for rec in records:
        seqs.setdefault(tuple(rec["tokens"]), len(seqs))
        for t in rec["tokens"]:
            vocab.setdefault(t, len(vocab))
    w = _width(max(len(vocab) - 1, 0))
    runs = []
    for rec in records:
        resp = rec["response"]
        vals = {}
        for k in schema.PER_TOKEN_NUMERIC:
            if rec.get(k) is not None:
                packed = _pack_values([v for v, r in zip(rec[k], resp) if r])
                if packed:
                    vals[k] = packed
        runs.append({**{k: rec.get(k) for k in SCALAR_FIELDS},
                     "seq": seqs[tuple(rec["tokens"])], "state": token_states(rec), "v": vals})
    return {"format": 2, "fields": [[k, label(k)] for k in schema.PER_TOKEN_NUMERIC],
            "vocab": list(vocab), "w": w,
            "seqs": ["".join(_code(vocab[t], w) for t in s) for s in seqs], "runs": runs}


def decode(data: dict) -> list[dict]:
    """The records in page data, as :func:`encode` stored them.

    Values come back rounded to thousandths; ``response``, ``keep`` and ``by_attention`` come
    back from the per-token state; a number absent from a run is absent from its record.
    """
    seqs = [[data["vocab"][i] for i in _unpack(s, data["w"])] for s in data["seqs"]]
    out = []
    for run in data["runs"]:
        st = run["state"]
        rec = {k: run[k] for k in SCALAR_FIELDS}
        rec.update(tokens=seqs[run["seq"]], response=[c != "p" for c in st],
                   keep=[c in "ka" for c in st], by_attention=[c == "a" for c in st])
        for k, f in run["v"].items():
            it = iter(_unpack_values(f))
            rec[k] = [next(it) if c != "p" else None for c in st]
        out.append(rec)
    return out
