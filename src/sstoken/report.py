"""See what was selected: a self-contained HTML page and PNG plots.

``sstoken show`` reads the per-token scores saved during training (``selection.jsonl``, one
record per example and method, written by :class:`sstoken.trainer.SelectionTrainer`) or scores a
model + data directly, and writes one HTML page that opens without network: every response
with kept tokens in blue, tokens kept mainly because of attention in orange (the paper's case
studies), a tooltip per token (REL, normalized REL, attention score, combined score, loss),
several methods side by side on the same example, filters by example and method, and the
plots embedded as PNG. The data is embedded once as JSON and rendered page by page in the
browser, so 1,000 examples stay a few MB and open quickly.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

RECORD_KEYS = ("id", "method", "tokens", "response", "keep")
PER_TOKEN = ("response", "keep", "loss", "rel", "rel_norm", "attn_score", "score", "by_attention")
NUMERIC = ("loss", "rel", "rel_norm", "attn_score", "score")


class ReportError(ValueError):
    """Bad scores input; the message names the file and line."""


# --------------------------------------------------------------------------- input

def read_scores(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Read and check scores JSONL files (as written by training)."""
    out = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ReportError(f"{path}: no such file")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ReportError(f"{where}: invalid JSON ({e.msg})") from e
                out.append(check_record(rec, where))
    return out


def check_record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ReportError(f"{where}: expected a JSON object")
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise ReportError(f"{where}: missing field(s) {missing}")
    n = len(rec["tokens"])
    for k in PER_TOKEN:
        v = rec.get(k)
        if v is not None and len(v) != n:
            raise ReportError(f"{where}: field {k!r} has {len(v)} values for {n} tokens")
    return rec


# --------------------------------------------------------------------------- page

def _r(x: Any) -> Any:
    """Thousandths as an integer (the tooltip shows 3 decimals): "1234" is shorter than
    "1.2341" and keeps 1,000 examples a few MB."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return int(round(x * 1000))


def _compact(records: list[dict]) -> dict:
    """Tokens stored once per example; per method a state string and values on R only.

    state: ``p`` prompt, ``d`` response not kept, ``k`` kept, ``a`` kept mainly by attention;
    values are integer thousandths (see :func:`_r`).
    """
    examples: dict[str, list[str]] = {}
    runs = []
    for rec in records:
        examples.setdefault(rec["id"], rec["tokens"])
        resp, keep = rec["response"], rec["keep"]
        by_attn = rec.get("by_attention") or [False] * len(resp)
        state = "".join("p" if not r else ("a" if k and a else "k" if k else "d")
                        for r, k, a in zip(resp, keep, by_attn))
        vals = {k: [_r(v) for v, r in zip(rec[k], resp) if r] for k in NUMERIC if rec.get(k) is not None}
        runs.append({"id": rec["id"], "method": rec["method"], "step": rec.get("step"),
                     "gamma": rec.get("gamma"), "rho": rec.get("rho"), "state": state, "v": vals})
    return {"examples": examples, "runs": runs}


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#fff;border-bottom:1px solid #dde1e6;padding:12px 20px;position:sticky;top:0;z-index:2}
h1{font-size:18px;margin:0 0 8px 0}
.controls{display:flex;gap:14px;flex-wrap:wrap;align-items:center;font-size:13px}
.controls input[type=text]{padding:3px 6px;width:220px}
.legend{display:flex;gap:12px;font-size:13px;margin-top:8px;flex-wrap:wrap}
.legend span.tok{padding:1px 6px}
main{padding:12px 20px}
.example{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:0 0 14px 0;padding:10px 12px}
.example h2{font-size:13px;margin:0 0 6px 0;color:#57606a;font-weight:600}
.cols{display:grid;gap:12px;grid-template-columns:repeat(auto-fit,minmax(380px,1fr))}
.col h3{font-size:12px;margin:0 0 4px 0;color:#0b5394}
.col .meta{font-size:11px;color:#6e7781;margin-bottom:4px}
.text{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;line-height:1.75;white-space:pre-wrap;word-break:break-word}
.tok{border-radius:3px;padding:1px 0}
.tok.prompt{color:#8c959f}
.tok.drop{color:#1b1f24}
.tok.kept{background:#cfe2ff;color:#052c65}
.tok.kept.attn{background:#ffd8a8;color:#5c2c00}
.tok.nl{color:#afb8c1}
.pager{display:flex;gap:8px;align-items:center;margin:10px 0;font-size:13px}
.plots img{max-width:100%;border:1px solid #dde1e6;background:#fff;margin:4px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:8px;margin-bottom:12px}
#tip{position:fixed;display:none;background:#1b1f24;color:#fff;font:12px ui-monospace,monospace;padding:6px 8px;border-radius:4px;pointer-events:none;z-index:5;white-space:pre}
"""

_JS = r"""
const DATA = JSON.parse(document.getElementById('sstoken-data').textContent);
const PAGE = 20;
const byId = {};
for (const r of DATA.runs) { (byId[r.id] = byId[r.id] || []).push(r); }
const ids = Object.keys(DATA.examples);
const methods = [...new Set(DATA.runs.map(r => r.method))];
let page = 0;
const $ = s => document.querySelector(s);
function esc(s) { return s.replace(/&/g,'&amp;').replace(/</g,'&lt;').replace(/>/g,'&gt;').replace(/"/g,'&quot;'); }
function fmt(x) { return x === null || x === undefined ? '-' : (x / 1000).toFixed(3); }
function buildMethodFilters() {
  const box = $('#methods');
  for (const m of methods) {
    const l = document.createElement('label');
    l.innerHTML = '<input type="checkbox" checked data-method="' + esc(m) + '"> ' + esc(m);
    box.appendChild(l);
  }
  box.addEventListener('change', () => { page = 0; render(); });
}
function selectedMethods() { return new Set([...document.querySelectorAll('#methods input:checked')].map(i => i.dataset.method)); }
function visibleIds() {
  const q = $('#filter').value.trim().toLowerCase();
  const ms = selectedMethods();
  return ids.filter(id => (!q || id.toLowerCase().includes(q)) && byId[id].some(r => ms.has(r.method)));
}
function renderRun(id, run) {
  const toks = DATA.examples[id];
  let out = '', j = 0;
  for (let i = 0; i < toks.length; i++) {
    const s = run.state[i];
    const cls = s === 'p' ? 'prompt' : s === 'd' ? 'drop' : s === 'k' ? 'kept' : 'kept attn';
    let tip = '';
    if (s !== 'p') {
      const v = run.v;
      tip = ' data-tip="' + esc(JSON.stringify(toks[i]).slice(1, -1)) + '|' +
        ['loss','rel','rel_norm','attn_score','score'].map(k => v[k] ? fmt(v[k][j]) : '-').join('|') + '"';
      j++;
    }
    const parts = toks[i].split('\n');
    let text = parts.map(esc).join('<span class="tok nl">\u21b5</span>\n');
    out += '<span class="tok ' + cls + '"' + tip + '>' + text + '</span>';
  }
  const kept = [...run.state].filter(c => c === 'k' || c === 'a').length;
  const resp = [...run.state].filter(c => c !== 'p').length;
  const meta = 'kept ' + kept + '/' + resp + (run.gamma !== null && run.gamma !== undefined ? ' \u00b7 gamma ' + run.gamma : '') +
    (run.rho ? ' \u00b7 rho ' + run.rho : '') + (run.step !== null && run.step !== undefined ? ' \u00b7 step ' + run.step : '');
  return '<div class="col"><h3>' + esc(run.method) + '</h3><div class="meta">' + meta + '</div><div class="text">' + out + '</div></div>';
}
function render() {
  const vis = visibleIds();
  const pages = Math.max(1, Math.ceil(vis.length / PAGE));
  page = Math.min(page, pages - 1);
  const ms = selectedMethods();
  let html = '';
  for (const id of vis.slice(page * PAGE, (page + 1) * PAGE)) {
    const runs = byId[id].filter(r => ms.has(r.method));
    html += '<section class="example"><h2>' + esc(id) + '</h2><div class="cols">' + runs.map(r => renderRun(id, r)).join('') + '</div></section>';
  }
  $('#examples').innerHTML = html || '<p>No example matches.</p>';
  $('#pageinfo').textContent = 'page ' + (page + 1) + ' / ' + pages + ' \u00b7 ' + vis.length + ' examples';
}
document.addEventListener('mouseover', e => {
  const t = e.target.closest('[data-tip]'); const tip = $('#tip');
  if (!t) { tip.style.display = 'none'; return; }
  const [tok, loss, rel, reln, attn, score] = t.dataset.tip.split('|');
  tip.textContent = 'token      "' + tok + '"\nloss       ' + loss + '\nREL        ' + rel + '\nnorm REL   ' + reln + '\nattention  ' + attn + '\nscore      ' + score;
  tip.style.display = 'block';
});
document.addEventListener('mousemove', e => { const tip = $('#tip'); tip.style.left = (e.clientX + 14) + 'px'; tip.style.top = (e.clientY + 14) + 'px'; });
$('#prev').onclick = () => { page = Math.max(0, page - 1); render(); };
$('#next').onclick = () => { page = page + 1; render(); };
$('#filter').addEventListener('input', () => { page = 0; render(); });
buildMethodFilters();
render();
"""


def _img(path: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def write_html(records: list[dict], path: str | os.PathLike, title: str = "sstoken: selected tokens",
               plots: dict[str, str] | None = None) -> Path:
    """Write the page (atomically) and return its path."""
    payload = json.dumps(_compact(records), ensure_ascii=False, separators=(",", ":"))
    # no "</script>" or "<!--" can end or confuse the data block (both are valid JSON escapes)
    payload = payload.replace("</", "<\\/").replace("<!--", "<\\u0021--")
    plot_html = "".join(_img(p) for p in (plots or {}).values() if p and Path(p).exists())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1>
<div class="controls"><label>example <input id="filter" type="text" placeholder="filter by id"></label>
<span id="methods">methods:</span>
<span class="pager"><button id="prev">&#9664;</button><span id="pageinfo"></span><button id="next">&#9654;</button></span></div>
<div class="legend"><b>legend</b><span class="tok kept">kept (selected for the loss)</span>
<span class="tok kept attn">kept mainly because of attention</span><span class="tok drop">response, not kept</span>
<span class="tok prompt">prompt (never trained)</span><span>hover a token for loss, REL, normalized REL, attention, score</span></div>
</header><main>{f'<div class="plots">{plot_html}</div>' if plot_html else ''}<div id="examples"></div></main>
<div id="tip"></div>
<script type="application/json" id="sstoken-data">{payload}</script>
<script>{_JS}</script></body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_history(state: str | os.PathLike | list) -> list[dict]:
    if isinstance(state, list):
        return state
    p = Path(state)
    if p.is_dir():
        p = p / "trainer_state.json"
    return json.loads(p.read_text()).get("log_history", [])


def plot_training(states: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Training loss and kept fraction per run: ``{"loss": png, "kept_frac": png}``."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, ylabel, name in (("loss", "loss of the selected tokens", "loss"),
                              ("sel/kept_frac", "kept fraction of response tokens", "kept_frac")):
        fig, ax = plt.subplots(figsize=(6, 3.4))
        drawn = False
        for label, state in states.items():
            pts = [(h["step"], h[key]) for h in _log_history(state) if key in h and "step" in h]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=label)
                drawn = True
        if drawn:
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            paths[name] = str(out_dir / f"training_{name}.png")
            fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths


def plot_score_histograms(records: list[dict], out_path: str | os.PathLike) -> str | None:
    """Distribution of the combined score of response tokens, one histogram per method."""
    plt = _plt()
    by_method: dict[str, list[float]] = {}
    for r in records:
        if r.get("score"):
            by_method.setdefault(r["method"], []).extend(
                v for v, resp in zip(r["score"], r["response"]) if resp and v is not None)
    if not by_method:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for m, vals in by_method.items():
        ax.hist(vals, bins=40, alpha=0.55, label=m)
    ax.set_xlabel("token score")
    ax.set_ylabel("response tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return str(out_path)


def plot_rel_vs_attn(records: list[dict], out_path: str | os.PathLike) -> str | None:
    """Normalized REL against attention score of every response token; kept vs not kept."""
    plt = _plt()
    pts = {True: ([], []), False: ([], [])}
    for r in records:
        if not (r.get("rel_norm") and r.get("attn_score")):
            continue
        for rn, a, resp, k in zip(r["rel_norm"], r["attn_score"], r["response"], r["keep"]):
            if resp and rn is not None and a is not None:
                pts[bool(k)][0].append(a)
                pts[bool(k)][1].append(rn)
    if not pts[True][0] and not pts[False][0]:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(*pts[False], s=5, alpha=0.4, color="#8c959f", label="not kept")
    ax.scatter(*pts[True], s=5, alpha=0.5, color="#1f6feb", label="kept")
    ax.set_xlabel("attention score (prompt mass)")
    ax.set_ylabel("normalized REL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return str(out_path)


def plot_ablation(rows: list[dict], x: str, y: str, out_path: str | os.PathLike,
                  group: str = "method") -> str | None:
    """A metric against gamma or rho (mean with stderr bars), one line per ``group``."""
    plt = _plt()
    series: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for r in rows:
        if r.get(x) is None or r.get(y) is None:
            continue
        series.setdefault(str(r.get(group, "")), {}).setdefault(float(r[x]), []).append(
            (float(r[y]), float(r.get("stderr") or 0.0)))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, pts in series.items():
        xs = sorted(pts)
        means = [sum(v for v, _ in pts[k]) / len(pts[k]) for k in xs]
        errs = [math.sqrt(sum(e * e for _, e in pts[k])) / len(pts[k]) for k in xs]
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return str(out_path)


# --------------------------------------------------------------------------- CLI

def add_show_parser(sub) -> None:
    p = sub.add_parser("show", help="HTML page of which tokens were selected, with plots",
                       description="Write one self-contained HTML page of selected tokens: from "
                                   "the scores saved in training (--scores), or by scoring a model "
                                   "on data directly (--model/--data, no training).")
    p.add_argument("--scores", nargs="*", default=[], help="selection.jsonl files (one per run/method)")
    p.add_argument("--trainer-state", nargs="*", default=[],
                   help="trainer_state.json files or run folders for the training plots (label=path)")
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


def run_show(args) -> int:
    records = list(getattr(args, "records", None) or [])
    if args.scores:
        records += read_scores(args.scores)
    if args.model:
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
    keep_ids = list(dict.fromkeys(r["id"] for r in records))[: args.max_examples]
    records = [r for r in records if r["id"] in set(keep_ids)]
    out = Path(args.output)
    plot_dir = out.with_name(out.stem + "_plots")
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    states = {}
    for spec in args.trainer_state:
        label, _, path = spec.rpartition("=")
        states[label or Path(path).name] = path
    if states:
        plots.update(plot_training(states, plot_dir))
    for name, fn in (("scores", plot_score_histograms), ("rel_vs_attn", plot_rel_vs_attn)):
        p = fn(records, plot_dir / f"{name}.png")
        if p:
            plots[name] = p
    write_html(records, out, args.title, plots)
    print(f"[sstoken] {len(keep_ids)} examples, {len(records)} records -> {out} "
          f"({out.stat().st_size / 1e6:.2f} MB); plots in {plot_dir}")
    return 0
