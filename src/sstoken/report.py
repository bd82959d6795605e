"""See what was selected: a self-contained HTML page and PNG plots.

``sstoken show`` reads the per-token scores saved during training (``selection.jsonl``, one
record per example and method, written by :class:`sstoken.trainer.SelectionTrainer`) or scores a
model + data directly, and writes one HTML page that opens without network: every response
with kept tokens in blue, tokens kept mainly because of attention in orange (the paper's case
studies), a tooltip per token (loss, REL, normalized REL, attention score, combined score),
several methods side by side on the same example (the paper's Appendix D), filters by example
and method, a summary table, and the plots embedded as PNG.

Page data (``<script type="application/json" id="sstoken-data">``), stored once and decoded
lazily in the browser, 20 examples per page::

    {"format": 2,
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
near 2 MB; :func:`read_report` decodes a page back into records.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import string
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

REQUIRED = ("id", "method", "tokens", "response", "keep")
PER_TOKEN = ("response", "keep", "loss", "rel", "rel_norm", "attn_score", "score", "by_attention")
NUMERIC = ("loss", "rel", "rel_norm", "attn_score", "score")

KEPT, ATTN, DROP = "#1f6feb", "#f08c00", "#8c959f"   # plot colours: the page's blue, orange, grey


class ReportError(ValueError):
    """Bad report input; the message names the file (and line) at fault."""


# --------------------------------------------------------------------------- input

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


def check_record(rec: Any, where: str = "record") -> dict:
    """Check one scores record and return it normalized.

    Required: ``id``, ``method``, ``tokens``, ``response``, ``keep``. Optional (null or absent is
    fine): ``step``, ``gamma``, ``rho`` and the per-token lists ``loss``, ``rel``, ``rel_norm``,
    ``attn_score``, ``score``, ``by_attention``. ``id`` and ``method`` become strings; null
    ``tokens`` (no tokenizer at training time) become position placeholders; a missing
    ``by_attention`` is derived as ``keep and (1-gamma)*attn_score > gamma*rel_norm`` when those
    are there, else all False.
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
        if k in NUMERIC and not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))
                                    for x in v):
            raise ReportError(f"{where}: field {k!r} must hold numbers or nulls")
    for k in ("gamma", "rho", "step"):
        if rec.get(k) is not None and not isinstance(rec[k], (int, float)):
            raise ReportError(f"{where}: field {k!r} must be a number or null")
    if rec.get("by_attention") is None:
        rec["by_attention"] = _derive_by_attention(rec)
    return rec


def _derive_by_attention(rec: dict) -> list[bool]:
    g, rn, a = rec.get("gamma"), rec.get("rel_norm"), rec.get("attn_score")
    if g is None or rn is None or a is None:
        return [False] * len(rec["tokens"])
    return [bool(k) and x is not None and y is not None and (1 - g) * y > g * x
            for k, x, y in zip(rec["keep"], rn, a)]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- page data

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
    q = [max(-10**12, min(10**12, round(v * 1000))) if _finite(v) else None for v in vals]
    present = [x for x in q if x is not None]
    if not present:
        return None
    lo = min(present)
    w = _width(max(present) - lo)
    null = 64 ** w - 1
    return {"o": lo, "w": w, "s": "".join(_code(null if x is None else x - lo, w) for x in q)}


def _state(rec: dict) -> str:
    return "".join("p" if not r else ("a" if k and a else "k" if k else "d")
                   for r, k, a in zip(rec["response"], rec["keep"], rec["by_attention"]))


def _compact(records: list[dict]) -> dict:
    """The page's data (format in the module docstring)."""
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
        for k in NUMERIC:
            if rec.get(k) is not None:
                packed = _pack_values([v for v, r in zip(rec[k], resp) if r])
                if packed:
                    vals[k] = packed
        runs.append({"id": rec["id"], "method": rec["method"], "step": rec.get("step"),
                     "gamma": rec.get("gamma"), "rho": rec.get("rho"),
                     "seq": seqs[tuple(rec["tokens"])], "state": _state(rec), "v": vals})
    return {"format": 2, "vocab": list(vocab), "w": w,
            "seqs": ["".join(_code(vocab[t], w) for t in s) for s in seqs], "runs": runs}


def read_report(path: str | os.PathLike) -> list[dict]:
    """The records embedded in a page written by :func:`write_html`, decoded.

    Values come back rounded to thousandths (what the page stores); ``response``, ``keep`` and
    ``by_attention`` come back from the per-token state.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        block = text.split('id="sstoken-data">', 1)[1].split("</script>", 1)[0]
        data = json.loads(block)
    except (IndexError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not an sstoken report page") from e
    seqs = [[data["vocab"][i] for i in _unpack(s, data["w"])] for s in data["seqs"]]
    out = []
    for run in data["runs"]:
        st = run["state"]
        rec = {k: run[k] for k in ("id", "method", "step", "gamma", "rho")}
        rec.update(tokens=seqs[run["seq"]], response=[c != "p" for c in st],
                   keep=[c in "ka" for c in st], by_attention=[c == "a" for c in st])
        for k, f in run["v"].items():
            null = 64 ** f["w"] - 1
            it = iter(None if x == null else (x + f["o"]) / 1000 for x in _unpack(f["s"], f["w"]))
            rec[k] = [next(it) if c != "p" else None for c in st]
        out.append(rec)
    return out


def _summary(records: list[dict]) -> str:
    """Per method: examples, response tokens, kept, kept mainly by attention (an HTML table)."""
    agg: dict[str, list[int]] = {}
    for r in records:
        a = agg.setdefault(r["method"], [0, 0, 0, 0])
        st = _state(r)
        a[0] += 1
        a[1] += len(st) - st.count("p")
        a[2] += st.count("k") + st.count("a")
        a[3] += st.count("a")
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{n}</td><td>{resp:,}</td>"
        f"<td>{kept:,} ({100 * kept / max(resp, 1):.1f}%)</td>"
        f"<td>{attn:,} ({100 * attn / max(kept, 1):.1f}% of kept)</td></tr>"
        for m, (n, resp, kept, attn) in agg.items())
    return ('<table class="summary"><thead><tr><th>method</th><th>examples</th>'
            '<th>response tokens</th><th>kept</th><th>kept mainly by attention</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


# --------------------------------------------------------------------------- page

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1f2328;background:#f6f8fa;font-size:14px}
header{background:#fff;border-bottom:1px solid #d0d7de;padding:10px 20px 8px;position:sticky;top:0;z-index:2;box-shadow:0 1px 3px rgba(0,0,0,.04)}
h1{font-size:18px;margin:0 0 8px 0}
.controls{display:flex;gap:8px 18px;flex-wrap:wrap;align-items:center;font-size:13px}
.controls input[type=search]{padding:3px 6px;width:200px;border:1px solid #d0d7de;border-radius:4px}
#methods label{margin-right:8px;white-space:nowrap}
.pager{display:flex;gap:6px;align-items:center}
.pager button{border:1px solid #d0d7de;background:#f6f8fa;border-radius:4px;padding:1px 8px;cursor:pointer}
.pager button:disabled{opacity:.4;cursor:default}
.legend{display:flex;gap:6px 14px;font-size:13px;margin-top:8px;flex-wrap:wrap;align-items:center}
.legend .tok{padding:1px 6px;font-family:ui-monospace,SFMono-Regular,Menlo,"DejaVu Sans Mono",monospace;font-size:12.5px}
.hint{color:#656d76;font-weight:400;font-size:12px}
main{padding:14px 20px;max-width:1800px}
.overview{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin-bottom:14px}
table.summary{border-collapse:collapse;background:#fff;border:1px solid #d0d7de;font-size:13px}
table.summary th,table.summary td{padding:4px 10px;border-bottom:1px solid #eaeef2;text-align:right}
table.summary th:first-child,table.summary td:first-child{text-align:left}
table.summary th{background:#f6f8fa;font-weight:600}
details.plots{flex:1 1 100%}
details.plots summary{cursor:pointer;font-weight:600;margin-bottom:6px}
.plotgrid{display:flex;gap:10px;overflow-x:auto;padding-bottom:4px;align-items:flex-start}
.plotgrid figure{margin:0;flex:none;max-width:100%;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:6px}
.plotgrid img{display:block;max-width:100%;height:auto;cursor:zoom-in}
.plotgrid.big{flex-wrap:wrap}
.plotgrid.big img{cursor:zoom-out}
.plotgrid figcaption{font-size:12px;color:#656d76;text-align:center}
.example{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:0 0 14px 0;padding:10px 14px}
.example h2{font-size:13px;margin:0 0 8px 0;color:#1f2328;font-weight:600}
.example h2 .n{color:#656d76;font-weight:400}
.promptbox{background:#f6f8fa;border-radius:4px;padding:6px 8px;margin-bottom:8px;max-height:9.5em;overflow:auto}
.label{font:600 11px system-ui,sans-serif;color:#656d76;text-transform:uppercase;letter-spacing:.04em;margin-bottom:2px}
.cols{display:grid;gap:14px;grid-template-columns:repeat(auto-fit,minmax(360px,1fr))}
.col{min-width:0}
.col h3{font-size:13px;margin:0;color:#0b5394}
.col .meta{font-size:11.5px;color:#656d76;margin:1px 0 4px}
.text{font-family:ui-monospace,SFMono-Regular,Menlo,"DejaVu Sans Mono",monospace;font-size:12.5px;line-height:1.8;white-space:pre-wrap;overflow-wrap:anywhere}
.tok{border-radius:3px;padding:1px 0}
.tok.prompt{color:#8c959f}
.tok.drop{color:#1f2328}
.tok.kept{background:#cfe2ff;color:#052c65}
.tok.kept.attn{background:#ffd8a8;color:#5c2c00}
.tok:hover{outline:1px solid #0969da}
.nl{color:#afb8c1}
.empty{color:#afb8c1}
#empty{color:#656d76}
#tip{position:fixed;display:none;background:#1f2328;color:#fff;font:12px/1.45 ui-monospace,"DejaVu Sans Mono",monospace;padding:6px 9px;border-radius:5px;pointer-events:none;z-index:5;white-space:pre;max-width:520px;overflow:hidden;box-shadow:0 2px 8px rgba(0,0,0,.25)}
"""

# Everything that reaches innerHTML goes through esc(); token text is also shown in the tooltip
# via textContent only.
_JS = r"""
'use strict';
const DATA = JSON.parse(document.getElementById('sstoken-data').textContent);
const T0 = performance.now();
const ALPHA = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_';
const DIGIT = {}; for (let i = 0; i < 64; i++) DIGIT[ALPHA[i]] = i;
const FIELDS = [['loss', 'loss'], ['rel', 'REL'], ['rel_norm', 'norm REL'], ['attn_score', 'attention'], ['score', 'score']];
const CLS = {p: 'tok prompt', d: 'tok drop', k: 'tok kept', a: 'tok kept attn'};
const STATE = {p: 'prompt (not trained)', d: 'response, not kept', k: 'kept', a: 'kept, mainly because of attention'};
const $ = s => document.querySelector(s);
const esc = s => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&#39;');
function unpack(s, w) {
  const n = s.length / w, out = new Array(n);
  for (let i = 0; i < n; i++) { let x = 0; for (let k = 0; k < w; k++) x = x * 64 + DIGIT[s[i * w + k]]; out[i] = x; }
  return out;
}
const cache = new Map();
function decoded(r) {            // tokens and per-position values of run r, decoded on first use
  if (cache.has(r)) return cache.get(r);
  const run = DATA.runs[r];
  const toks = unpack(DATA.seqs[run.seq], DATA.w).map(i => DATA.vocab[i]);
  const vals = {};
  for (const [k] of FIELDS) {
    const f = run.v[k]; if (!f) continue;
    const nul = Math.pow(64, f.w) - 1;
    vals[k] = unpack(f.s, f.w).map(x => x === nul ? null : (x + f.o) / 1000);
  }
  const ridx = []; let j = 0;    // position -> index among response positions
  for (const c of run.state) ridx.push(c === 'p' ? -1 : j++);
  const d = {toks, vals, ridx}; cache.set(r, d); return d;
}
const byId = new Map();
DATA.runs.forEach((r, i) => { if (!byId.has(r.id)) byId.set(r.id, []); byId.get(r.id).push(i); });
const ids = [...byId.keys()];
const methods = [...new Set(DATA.runs.map(r => r.method))];
let page = 0, perPage = 20;

function tokenHtml(t) {
  if (t === '') return '<span class="empty">\u2205</span>';
  return t.split(/\r?\n/).map(esc).join('<span class="nl">\u21b5</span>\n');
}
function spans(r, from, to) {
  const d = decoded(r), st = DATA.runs[r].state;
  let out = '';
  for (let i = from; i < to; i++) out += '<span class="' + CLS[st[i]] + '" data-i="' + i + '">' + tokenHtml(d.toks[i]) + '</span>';
  return out;
}
function count(s, chars) { let n = 0; for (const c of s) if (chars.includes(c)) n++; return n; }
function column(r, from) {
  const run = DATA.runs[r], st = run.state;
  const resp = count(st, 'dka'), kept = count(st, 'ka'), attn = count(st, 'a');
  const meta = ['kept ' + kept + ' / ' + resp + (resp ? ' (' + Math.round(100 * kept / resp) + '%)' : '')];
  if (attn) meta.push(attn + ' by attention');
  if (run.gamma !== null && run.gamma !== undefined) meta.push('\u03b3 ' + run.gamma);
  if (run.rho !== null && run.rho !== undefined) meta.push('\u03c1 ' + run.rho);
  if (run.step !== null && run.step !== undefined) meta.push('step ' + run.step);
  return '<div class="col" data-r="' + r + '"><h3>' + esc(run.method) + '</h3><div class="meta">' +
    esc(meta.join(' \u00b7 ')) + '</div><div class="text">' + spans(r, from, st.length) + '</div></div>';
}
function firstResponse(st) { const i = st.search(/[dka]/); return i < 0 ? st.length : i; }
function renderExample(id, rs) {
  // one token sequence for all methods: show its leading prompt once, then responses side by side
  const shared = new Set(rs.map(r => DATA.runs[r].seq)).size === 1;
  const from = shared ? Math.min(...rs.map(r => firstResponse(DATA.runs[r].state))) : 0;
  let h = '<section class="example"><h2>' + esc(id) + ' <span class="n">\u00b7 ' + rs.length +
    (rs.length === 1 ? ' run' : ' runs side by side') + '</span></h2>';
  if (from > 0) h += '<div class="label">prompt</div><div class="promptbox text" data-r="' + rs[0] + '">' + spans(rs[0], 0, from) + '</div>';
  return h + '<div class="cols">' + rs.map(r => column(r, from)).join('') + '</div></section>';
}
function selectedMethods() { return new Set([...document.querySelectorAll('#methods input:checked')].map(i => i.value)); }
function visible() {
  const q = $('#filter').value.trim().toLowerCase(), ms = selectedMethods(), out = [];
  for (const id of ids) {
    if (q && !id.toLowerCase().includes(q)) continue;
    const rs = byId.get(id).filter(r => ms.has(DATA.runs[r].method));
    if (rs.length) out.push([id, rs]);
  }
  return out;
}
function render() {
  const vis = visible(), pages = Math.max(1, Math.ceil(vis.length / perPage));
  page = Math.max(0, Math.min(page, pages - 1));
  const html = vis.slice(page * perPage, (page + 1) * perPage).map(([id, rs]) => renderExample(id, rs)).join('');
  $('#examples').innerHTML = html || '<p id="empty">No example matches the filters.</p>';
  const info = 'page ' + (page + 1) + ' / ' + pages + ' \u00b7 ' + vis.length + ' of ' + ids.length + ' examples';
  for (const el of document.querySelectorAll('.pageinfo')) el.textContent = info;
  for (const el of document.querySelectorAll('.prev')) el.disabled = page === 0;
  for (const el of document.querySelectorAll('.next')) el.disabled = page >= pages - 1;
}
function go(delta, top) { page += delta; render(); if (top) window.scrollTo(0, 0); }
function tipText(t, holder) {
  const r = +holder.dataset.r, i = +t.dataset.i, run = DATA.runs[r], d = decoded(r), j = d.ridx[i];
  const lines = [JSON.stringify(d.toks[i]) + '   #' + i + ' \u00b7 ' + STATE[run.state[i]]];
  if (j >= 0) {
    for (const [k, label] of FIELDS) {
      const v = d.vals[k] ? d.vals[k][j] : null;
      lines.push((label + '          ').slice(0, 11) + (v === null || v === undefined ? '-' : v.toFixed(3)));
    }
    const g = run.gamma, rn = d.vals.rel_norm && d.vals.rel_norm[j], at = d.vals.attn_score && d.vals.attn_score[j];
    if (g !== null && g !== undefined && rn !== null && rn !== undefined && at !== null && at !== undefined)
      lines.push('score = \u03b3\u00b7normREL + (1-\u03b3)\u00b7attn = ' + (g * rn).toFixed(3) + ' + ' + ((1 - g) * at).toFixed(3));
  }
  return lines.join('\n');
}
document.addEventListener('mouseover', e => {
  const tip = $('#tip'), t = e.target.closest ? e.target.closest('.tok[data-i]') : null;
  const holder = t && t.closest('[data-r]');
  if (!holder) { tip.style.display = 'none'; return; }
  tip.textContent = tipText(t, holder);
  tip.style.display = 'block';
});
document.addEventListener('mousemove', e => {
  const tip = $('#tip'); if (tip.style.display !== 'block') return;
  const x = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = e.clientY + 16 + tip.offsetHeight > window.innerHeight ? e.clientY - tip.offsetHeight - 10 : e.clientY + 16;
  tip.style.left = Math.max(4, x) + 'px'; tip.style.top = Math.max(4, y) + 'px';
});
document.addEventListener('keydown', e => {
  if (e.target.tagName === 'INPUT' || e.target.tagName === 'SELECT') return;
  if (e.key === 'ArrowRight') go(1); else if (e.key === 'ArrowLeft') go(-1);
});
for (const b of document.querySelectorAll('.prev')) b.onclick = () => go(-1, b.classList.contains('bottom'));
for (const b of document.querySelectorAll('.next')) b.onclick = () => go(1, b.classList.contains('bottom'));
$('#perpage').onchange = e => { perPage = +e.target.value; page = 0; render(); };
$('#filter').addEventListener('input', () => { page = 0; render(); });
const box = $('#methods');
for (const m of methods) {
  const l = document.createElement('label');
  const n = DATA.runs.filter(r => r.method === m).length;
  l.innerHTML = '<input type="checkbox" checked value="' + esc(m) + '"> ' + esc(m) + ' <span class="n">(' + n + ')</span>';
  box.appendChild(l);
}
box.addEventListener('change', () => { page = 0; render(); });
for (const img of document.querySelectorAll('.plotgrid img')) img.onclick = () => {
  const g = img.closest('.plotgrid'); g.classList.toggle('big');
  for (const i of g.querySelectorAll('img')) {    // natural size when enlarged, else the page scale
    if (!i.dataset.w) i.dataset.w = i.style.width;
    i.style.width = g.classList.contains('big') ? '' : i.dataset.w;
  }
};
render();
document.body.dataset.renderMs = (performance.now() - T0).toFixed(1);
"""


def _img(label: str, path: str | os.PathLike) -> str:
    raw = Path(path).read_bytes()
    # every figure at the same scale (one inch = _CSS_PX_PER_INCH px), whatever its size:
    # the PNG header gives its width in pixels, saved at _DPI; click a figure for full size
    width = int.from_bytes(raw[16:20], "big") if raw[:8] == b"\x89PNG\r\n\x1a\n" else 0
    style = f' style="width:{round(width / _DPI * _CSS_PX_PER_INCH)}px"' if width else ""
    data = base64.b64encode(raw).decode()
    return (f'<figure><img alt="{html.escape(label)}" title="click to enlarge"{style} '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(label)}</figcaption></figure>')


def _pager(where: str) -> str:
    return (f'<span class="pager"><button class="prev {where}" title="previous page (\u2190)">\u25c0</button>'
            f'<span class="pageinfo"></span>'
            f'<button class="next {where}" title="next page (\u2192)">\u25b6</button></span>')


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_html(records: list[dict], path: str | os.PathLike, title: str = "sstoken: selected tokens",
               plots: Mapping[str, str | os.PathLike | None] | None = None) -> Path:
    """Write the report page for ``records`` (atomically) and return its path.

    ``records`` are scores records (see :func:`check_record`; they are checked here too);
    ``plots`` maps a caption to a PNG path, embedded as a data URI (missing paths are skipped).
    The page needs no network: CSS, JS, data and images are inline.
    """
    records = [check_record(r, f"record {i}") for i, r in enumerate(records)]
    payload = json.dumps(_compact(records), ensure_ascii=False, separators=(",", ":"))
    # Inside <script> only "</" (as in "</script>") and "<!--" can end or confuse the block;
    # both occur only inside JSON strings, where "\/" and "\u0021" are valid escapes.
    payload = payload.replace("</", "<\\/").replace("<!--", "<\\u0021--")
    figs = [_img(label, p) for label, p in (plots or {}).items() if p and Path(p).is_file()]
    figures = "".join(figs)
    plots_html = ('<details class="plots" open><summary>plots <span class="hint">'
                  f"({len(figs)}; scroll sideways, click one to enlarge)</span></summary>"
                  f'<div class="plotgrid">{figures}</div></details>') if figs else ""
    t = html.escape(title)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body><header><h1>{t}</h1>
<div class="controls"><label>example <input id="filter" type="search" placeholder="filter by id"></label>
<span id="methods"><b>methods</b> </span>
<label>per page <select id="perpage"><option>10</option><option selected>20</option><option>50</option><option>100</option></select></label>
{_pager("top")}</div>
<div class="legend"><b>legend</b><span class="tok kept">kept (trained on)</span>
<span class="tok kept attn">kept mainly because of attention</span><span class="tok drop">response, not kept</span>
<span class="tok prompt">prompt (never trained)</span><span class="nl">\u21b5 newline</span>
<span class="hint">hover a token: loss, REL, normalized REL, attention score, combined score</span></div>
</header><main>
<div class="overview">{_summary(records)}{plots_html}</div>
<noscript>The examples are rendered by JavaScript; enable it to see them.</noscript>
<div id="examples"></div>
<div class="controls">{_pager("bottom")}</div>
</main><div id="tip"></div>
<script type="application/json" id="sstoken-data">{payload}</script>
<script>{_JS}</script></body></html>
"""
    path = Path(path)
    _atomic_write(path, page)
    return path


# --------------------------------------------------------------------------- plots

_DPI = 150               # PNG resolution (crisp when zoomed)
_CSS_PX_PER_INCH = 92    # shown at this scale on the page: a 2.9 in tall plot is ~270 px


def _figure(w: float, h: float, rows: int = 1, cols: int = 1):
    """A figure without pyplot (no global backend state; PNG through Agg)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=_DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig, out_path: str | os.PathLike) -> str:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, format="png")
    return str(out_path)


def _log_history(state: Any) -> list[dict]:
    """``log_history`` from a trainer_state.json path, a run folder holding one, the parsed
    state, or the list itself."""
    if isinstance(state, list):
        return state
    if isinstance(state, dict):
        return state.get("log_history", [])
    p = Path(state)
    if p.is_dir():
        p = p / "trainer_state.json"
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("log_history", [])
    except FileNotFoundError as e:
        raise ReportError(f"{p}: no such trainer state") from e
    except json.JSONDecodeError as e:
        raise ReportError(f"{p}: invalid JSON ({e.msg})") from e


_SELECTION_STATS = (("sel/rel_mean", "mean REL"), ("sel/attn_mean", "mean attention score"),
                    ("sel/rel_attn_corr", "corr(REL, attention)"),
                    ("sel/attn_driven_frac", "kept mainly by attention"))


def plot_training(states: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Training curves of one or more runs, as PNGs in ``out_dir``.

    ``states`` maps a run label to its trainer_state.json (path, run folder, parsed dict or
    ``log_history`` list). Returns ``{"training loss": png, "kept fraction": png,
    "selection statistics": png}``, each only when some run logged that quantity (``loss``,
    ``sel/kept_frac``, and any of ``sel/rel_mean``, ``sel/attn_mean``, ``sel/rel_attn_corr``,
    ``sel/attn_driven_frac``).
    """
    out_dir = Path(out_dir)
    hist = {label: _log_history(s) for label, s in states.items()}

    def series(h: list[dict], key: str):
        return [(e["step"], e[key]) for e in h if _finite(e.get(key)) and _finite(e.get("step"))]

    paths: dict[str, str] = {}
    for key, ylabel, name, fname in (("loss", "loss (kept tokens)", "training loss", "training_loss"),
                                     ("sel/kept_frac", "kept fraction of response tokens",
                                      "kept fraction", "training_kept_frac")):
        lines = {label: series(h, key) for label, h in hist.items()}
        if not any(lines.values()):
            continue
        fig, (ax,) = _figure(4.6, 2.9)
        for label, pts in lines.items():
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 60 else None, label=label)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths[name] = _save(fig, out_dir / f"{fname}.png")
    present = [(k, t) for k, t in _SELECTION_STATS if any(series(h, k) for h in hist.values())]
    if present:
        cols = len(present)
        fig, axes = _figure(2.9 * cols + 0.3, 2.9, 1, cols)
        for ax, (key, label_) in zip(axes, present):
            for label, h in hist.items():
                pts = series(h, key)
                if pts:
                    ax.plot(*zip(*pts), label=label)
            ax.set_title(label_, fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_xlabel("optimizer step", fontsize=8)
            ax.tick_params(labelsize=8)
        for ax in axes[len(present):]:
            ax.set_visible(False)
        axes[0].legend(fontsize=7)
        paths["selection statistics"] = _save(fig, out_dir / "training_selection.png")
    return paths


def _response_values(rec: dict, key: str):
    """(value, state) of response positions with a finite ``key`` value."""
    vals = rec.get(key)
    if vals is None:
        return []
    return [(v, s) for v, s in zip(vals, _state(rec)) if s != "p" and _finite(v)]


def _panels(n: int, row_height: float):
    """A grid of ``n`` plot panels, at most 4 per row."""
    cols = min(4, n)
    rows = math.ceil(n / cols)
    return _figure(3.4 * cols + 0.3, row_height * rows, rows, cols)


def plot_score_histograms(records: list[dict], out_path: str | os.PathLike,
                          key: str = "score") -> str | None:
    """Distribution of the combined score of response tokens, one panel per method, stacked by
    outcome (not kept grey, kept blue, kept mainly by attention orange). None if no record has
    scores."""
    by_method: dict[str, list] = {}
    for r in records:
        pts = _response_values(r, key)
        if pts:
            by_method.setdefault(r["method"], []).extend(pts)
    if not by_method:
        return None
    n = len(by_method)
    fig, axes = _panels(n, 2.9)
    for ax, (m, pts) in zip(axes, by_method.items()):
        groups = [[v for v, s in pts if s == c] for c in "dka"]
        lo, hi = min(v for v, _ in pts), max(v for v, _ in pts)
        bins = 40 if hi > lo else 1
        ax.hist(groups, bins=bins, range=(lo, hi) if hi > lo else None, stacked=True,
                color=[DROP, KEPT, ATTN], label=["not kept", "kept", "kept by attention"])
        ax.set_title(m, fontsize=10)
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel("response tokens", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    return _save(fig, out_path)


def plot_rel_vs_attn(records: list[dict], out_path: str | os.PathLike,
                     max_points: int = 20000) -> str | None:
    """Normalized REL against attention score of response tokens, one panel per method that
    has both (at most ``max_points`` per panel, a fixed subsample); not kept grey, kept blue,
    kept mainly by attention orange, and the line (1-gamma) attn = gamma normREL where the
    method's records share one gamma. None if no record has both."""
    import random

    per: dict[str, dict] = {}
    for r in records:
        if r.get("rel_norm") is None or r.get("attn_score") is None:
            continue
        d = per.setdefault(r["method"], {"pts": [], "gammas": set()})
        d["gammas"].add(r.get("gamma"))
        d["pts"].extend((a, rn, s) for rn, a, s in zip(r["rel_norm"], r["attn_score"], _state(r))
                        if s != "p" and _finite(rn) and _finite(a))
    per = {m: d for m, d in per.items() if d["pts"]}
    if not per:
        return None
    n = len(per)
    fig, axes = _panels(n, 3.1)
    for ax, (m, d) in zip(axes, per.items()):
        pts = d["pts"]
        if len(pts) > max_points:
            pts = random.Random(0).sample(pts, max_points)
        for c, color, label in (("d", DROP, "not kept"), ("k", KEPT, "kept"),
                                ("a", ATTN, "kept by attention")):
            xs = [p[0] for p in pts if p[2] == c]
            ys = [p[1] for p in pts if p[2] == c]
            if xs:
                ax.scatter(xs, ys, s=4, alpha=0.45, color=color, label=label, linewidths=0)
        g = next(iter(d["gammas"])) if len(d["gammas"]) == 1 else None
        if _finite(g) and 0 < g < 1:
            xmax = max(p[0] for p in pts) or 1.0
            ax.plot([0, xmax], [0, (1 - g) / g * xmax], color="#57606a", lw=0.8, ls="--",
                    label=f"(1-\u03b3)\u00b7attn = \u03b3\u00b7normREL (\u03b3={g:g})")
            ax.set_ylim(-0.04, 1.04)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("attention score (prompt mass)", fontsize=9)
        ax.set_ylabel("normalized REL", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, markerscale=2.5, loc="upper right")
    for ax in axes[n:]:
        ax.set_visible(False)
    return _save(fig, out_path)


def plot_ablation(rows: list[dict], x: str, y: str, out_path: str | os.PathLike,
                  group: str = "method") -> str | None:
    """A metric ``y`` against ``x`` (``"gamma"`` or ``"rho"``), one line per ``group``.

    Rows are dicts like ``{"gamma": 0.5, "rho": 0.6, "method": "sstoken", "score": 41.2,
    "stderr": 0.8}``. One row at an x: the error bar is its ``stderr`` (or ``<y>_stderr``).
    Several rows at the same x (seeds): their mean, with the stderr of that mean over the rows
    (sd / sqrt(n)), which is the training noise the comparison has to beat. Rows missing ``x``
    or ``y`` are skipped; None if none is left.
    """
    from .evaluate import mean_se

    series: dict[str, dict[float, list[tuple[float, float | None]]]] = {}
    for r in rows:
        if not (_finite(r.get(x)) and _finite(r.get(y))):
            continue
        err = r.get("stderr", r.get(f"{y}_stderr"))
        series.setdefault(str(r.get(group, y)), {}).setdefault(float(r[x]), []).append(
            (float(r[y]), float(err) if _finite(err) else None))
    if not series:
        return None
    fig, (ax,) = _figure(4.6, 2.9)
    for name, pts in series.items():
        xs = sorted(pts)
        means = [sum(v for v, _ in pts[k]) / len(pts[k]) for k in xs]
        errs = [mean_se([v for v, _ in pts[k]])[1] if len(pts[k]) > 1 else (pts[k][0][1] or 0.0) for k in xs]
        has_err = any(len(pts[k]) > 1 or pts[k][0][1] is not None for k in xs)
        ax.errorbar(xs, means, yerr=errs if has_err else None, marker="o", capsize=3, label=name)
    ax.set_xlabel({"gamma": "\u03b3 (weight of REL)", "rho": "\u03c1 (kept fraction)"}.get(x, x), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.set_ylabel(y, fontsize=9)
    ax.set_title(f"{y} vs {x}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


# --------------------------------------------------------------------------- CLI

def add_show_parser(sub) -> None:
    """Register ``sstoken show`` on an argparse subparsers object (``func=run_show``)."""
    p = sub.add_parser("show", help="HTML page of which tokens were selected, with plots",
                       description="Write one self-contained HTML page of selected tokens: from "
                                   "the scores saved in training (--scores), or by scoring a model "
                                   "on data directly (--model/--data, no training).")
    p.add_argument("--scores", nargs="+", action="extend", default=[], metavar="FILE",
                   help="scores JSONL files (selection.jsonl of one or more runs/methods)")
    p.add_argument("--trainer-state", nargs="+", action="extend", default=[], metavar="[LABEL=]PATH",
                   help="trainer_state.json or run folder for the training plots; repeatable")
    # Scoring without training (the records are built by sstoken.pipeline.run_score_records).
    p.add_argument("--model", default=None, help="score this model directly (no training)")
    p.add_argument("--adapter", default=None, help="a trained LoRA adapter on --model: REL = base - adapter")
    p.add_argument("--data", default=None, help="data to score with --model")
    p.add_argument("--methods", default="sstoken", help="comma-separated methods for --model (e.g. sstoken,random)")
    p.add_argument("--rho", type=float, default=0.6, help="selection ratio for --model")
    p.add_argument("--gamma", type=float, default=0.5, help="ssToken gamma for --model")
    p.add_argument("--attn-layer", default="-1", help="attention layer for --model")
    p.add_argument("--ref-model", default=None, help="reference model for rho1/tokencleaning with --model")
    p.add_argument("--max-seq-length", type=int, default=2048, help="truncate samples (with --model)")
    p.add_argument("--max-examples", type=int, default=1000, help="at most this many examples on the page")
    p.add_argument("--output", default="sstoken-report.html", help="the HTML file to write")
    p.add_argument("--title", default="sstoken: selected tokens", help="page title")
    p.set_defaults(func=run_show)


def _state_specs(specs: list[str]) -> dict[str, str]:
    """``label=path`` or ``path`` (labelled by its run folder) -> {label: path}."""
    out = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            label, path = "", spec
        p = Path(path)
        out[label or (p.parent.name if p.is_file() else p.name) or path] = path
    return out


def run_show(args) -> int:
    """``sstoken show``: plots + page from ``args.records`` (if a caller set it), ``--scores``
    files and/or records scored with ``--model/--data``."""
    records = list(getattr(args, "records", None) or [])
    if getattr(args, "scores", None):
        try:
            records += read_scores(args.scores)
        except ReportError as e:
            raise SystemExit(f"sstoken show: {e}") from e
    if getattr(args, "model", None):
        if not args.data:
            raise SystemExit("sstoken show: --model needs --data")
        from .config import DataArguments, SelectionArguments
        from .pipeline import run_score_records

        for m in [m.strip() for m in args.methods.split(",") if m.strip()]:
            sel = SelectionArguments(method=m, rho=args.rho, gamma=args.gamma, attn_layer=args.attn_layer,
                                     ref_model=args.ref_model)
            records += run_score_records(args.model, args.adapter,
                                         DataArguments(data=args.data, max_seq_length=args.max_seq_length),
                                         sel, max_examples=args.max_examples)
    if not records:
        raise SystemExit("sstoken show: nothing to show; give --scores or --model/--data")
    keep_ids = set(list(dict.fromkeys(r["id"] for r in records))[: args.max_examples])
    records = [r for r in records if r["id"] in keep_ids]
    out = Path(args.output)
    plot_dir = out.with_name(out.stem + "_plots")
    plots: dict[str, str] = {}
    try:
        states = _state_specs(getattr(args, "trainer_state", None) or [])
        if states:
            plots.update(plot_training(states, plot_dir))
    except ReportError as e:
        raise SystemExit(f"sstoken show: {e}") from e
    for name, fn, fname in (("score distribution", plot_score_histograms, "scores.png"),
                            ("normalized REL vs attention", plot_rel_vs_attn, "rel_vs_attn.png")):
        p = fn(records, plot_dir / fname)
        if p:
            plots[name] = p
    write_html(records, out, args.title, plots)
    print(f"[sstoken] {len(keep_ids)} examples, {len(records)} records -> {out} "
          f"({out.stat().st_size / 1e6:.2f} MB); plots in {plot_dir}")
    return 0
