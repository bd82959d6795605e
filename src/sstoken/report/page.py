"""The report page: one self-contained HTML file of selected tokens (and back).

Every response with kept tokens in blue, tokens kept mainly because of attention in orange (the
paper's case studies), a tooltip per token (loss, REL, normalized REL, attention score,
combined score), several methods side by side on the same example (the paper's Appendix D),
filters by example and method, a summary table, and the plots embedded as PNG. The page opens
without network: its CSS and JS (package data, ``static/report.css`` and ``static/report.js``),
the data (:mod:`sstoken.report.codec`) and the images are all inline.
"""

from __future__ import annotations

import base64
import html
import json
import os
from importlib import resources
from pathlib import Path
from typing import Mapping

from ..io import atomic_write
from .. import records as schema
from ..records import TOKEN_CLASSES, ReportError, check_record, kept_by_class, token_states
from . import codec
from .plots import DPI

_CSS_PX_PER_INCH = 92    # plots shown at this scale on the page: a 2.9 in tall plot is ~270 px
_DATA_ID = "sstoken-data"


def static_text(name: str) -> str:
    """A file of ``sstoken/report/static`` (``report.css``, ``report.js``), read as package data."""
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _summary(records: list[dict]) -> str:
    """Per method: examples, response tokens, kept, kept mainly by attention (an HTML table)."""
    agg: dict[str, list[int]] = {}
    for r in records:
        a = agg.setdefault(r["method"], [0, 0, 0, 0])
        st = token_states(r)
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
            f"<tbody>{rows}</tbody></table>" + _by_class(records))


def _by_class(records: list[dict]) -> str:
    """Per method: the kept fraction of each token class (numbers, words, punctuation...), an
    HTML table; empty when no record has token text."""
    per: dict[str, list[dict]] = {}
    for r in records:
        if r.get("tokens") is not None:
            per.setdefault(r["method"], []).append(r)
    if not per:
        return ""
    counts = {m: kept_by_class(rs) for m, rs in per.items()}
    classes = [c for c in TOKEN_CLASSES if any(counts[m][c][1] for m in counts)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td>" + "".join(
            f"<td>{k / n:.2f} <small>of {n:,}</small></td>" if n else "<td>-</td>"
            for k, n in (cnt[c] for c in classes)) + "</tr>"
        for m, cnt in counts.items())
    return ('<table class="summary by-class"><caption>kept fraction by token class</caption>'
            f"<thead><tr><th>method</th>{head}</tr></thead><tbody>{rows}</tbody></table>")


def _img(label: str, path: str | os.PathLike) -> str:
    raw = Path(path).read_bytes()
    # every figure at the same scale (one inch = _CSS_PX_PER_INCH px), whatever its size:
    # the PNG header gives its width in pixels, saved at DPI; click a figure for full size
    width = int.from_bytes(raw[16:20], "big") if raw[:8] == b"\x89PNG\r\n\x1a\n" else 0
    style = f' style="width:{round(width / DPI * _CSS_PX_PER_INCH)}px"' if width else ""
    data = base64.b64encode(raw).decode()
    return (f'<figure><img alt="{html.escape(label)}" title="click to enlarge"{style} '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(label)}</figcaption></figure>')


def _pager(where: str) -> str:
    return (f'<span class="pager"><button class="prev {where}" title="previous page (\u2190)">\u25c0</button>'
            f'<span class="pageinfo"></span>'
            f'<button class="next {where}" title="next page (\u2192)">\u25b6</button></span>')


def write_html(records: list[dict], path: str | os.PathLike, title: str = "sstoken: selected tokens",
               plots: Mapping[str, str | os.PathLike | None] | None = None) -> Path:
    """Write the report page for ``records`` (atomically) and return its path.

    ``records`` are scores records (see :func:`sstoken.records.check_record`; they are checked
    here too); ``plots`` maps a caption to a PNG path, embedded as a data URI (missing paths are
    skipped). The page needs no network: CSS, JS, data and images are inline.
    """
    records = [check_record(r, f"record {i}") for i, r in enumerate(records)]
    payload = json.dumps(codec.encode(records), ensure_ascii=False, separators=(",", ":"))
    # Inside <script> only "</" (as in "</script>") and "<!--" can end or confuse the block;
    # both occur only inside JSON strings, where "\/" and "\u0021" are valid escapes.
    payload = payload.replace("</", "<\\/").replace("<!--", "<\\u0021--")
    figs = [_img(label, p) for label, p in (plots or {}).items() if p and Path(p).is_file()]
    figures = "".join(figs)
    plots_html = ('<details class="plots" open><summary>plots <span class="hint">'
                  f"({len(figs)}; scroll sideways, click one to enlarge)</span></summary>"
                  f'<div class="plotgrid">{figures}</div></details>') if figs else ""
    hover = html.escape(", ".join(codec.description(k) for k in schema.PER_TOKEN_NUMERIC))
    t = html.escape(title)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>
{static_text("report.css")}</style></head>
<body><header><h1>{t}</h1>
<div class="controls"><label>example <input id="filter" type="search" placeholder="filter by id"></label>
<span id="methods"><b>methods</b> </span>
<label>per page <select id="perpage"><option>10</option><option selected>20</option><option>50</option><option>100</option></select></label>
{_pager("top")}</div>
<div class="legend"><b>legend</b><span class="tok kept">kept (trained on)</span>
<span class="tok kept attn">kept mainly because of attention</span><span class="tok drop">response, not kept</span>
<span class="tok prompt">prompt (never trained)</span><span class="nl">\u21b5 newline</span>
<span class="hint">hover a token: {hover}</span></div>
</header><main>
<div class="overview">{_summary(records)}{plots_html}</div>
<noscript>The examples are rendered by JavaScript; enable it to see them.</noscript>
<div id="examples"></div>
<div class="controls">{_pager("bottom")}</div>
</main><div id="tip"></div>
<script type="application/json" id="{_DATA_ID}">{payload}</script>
<script>
{static_text("report.js")}</script></body></html>
"""
    return atomic_write(path, page)


def read_report(path: str | os.PathLike) -> list[dict]:
    """The records embedded in a page written by :func:`write_html`, decoded.

    Values come back rounded to thousandths (what the page stores); ``response``, ``keep`` and
    ``by_attention`` come back from the per-token state.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        block = text.split(f'id="{_DATA_ID}">', 1)[1].split("</script>", 1)[0]
        data = json.loads(block)
    except (IndexError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not an sstoken report page") from e
    return codec.decode(data)
