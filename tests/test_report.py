"""The selection report (sstoken.report): page structure and escaping, compact data (size, round
trip), static files, plots, the `show` command; and the page rendered in headless Chromium
(-m browser). The record schema and its files: test_records.py."""
import json
import os
import random
import re
import shutil
import subprocess
import time

import pytest
from fake_scores import fake_record

from sstoken.report import (ReportError, plot_ablation, plot_rel_vs_attn, plot_score_histograms,
                            plot_training, read_report, write_html)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def page_data(text):
    block = text.split('id="sstoken-data">')[1].split("</script>")[0]
    return json.loads(block)


# --------------------------------------------------------------------------- page

def test_page_structure_side_by_side_legend_and_filters(tmp_path):
    recs = [fake_record(k, m, gamma=0.5 if m == "sstoken" else None)
            for k in range(3) for m in ("sstoken", "random")]
    path = write_html(recs, tmp_path / "r.html", title="T <&>")
    text = path.read_text()
    assert "<title>T &lt;&amp;&gt;</title>" in text
    assert re.search(r'<div class="legend">', text)
    for cls in ("tok kept", "tok kept attn", "tok drop", "tok prompt"):
        assert f'<span class="{cls}">' in text                      # legend swatches = token classes
    assert 'id="filter"' in text and 'id="methods"' in text and 'class="pager"' in text
    assert 'class="summary"' in text and "<td>random</td>" in text
    assert text.count("<script") == 2                               # the data block and the code
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".r.html*"))
    data = page_data(text)
    assert [r["method"] for r in data["runs"] if r["id"] == "ex1"] == ["sstoken", "random"]
    assert len(data["seqs"]) == 6 and data["w"] == 2              # distinct sequences, 2-digit vocab


def test_page_shows_the_kept_fraction_by_token_class(tmp_path):
    rec = {"id": "a", "method": "sstoken", "tokens": ["Q", " has", " 1", "2", " cats", ".", "<|im_end|>"],
           "response": [False, True, True, True, True, True, True],
           "keep": [False, True, False, True, True, False, True]}
    text = write_html([rec], tmp_path / "r.html").read_text()
    table = text[text.index('class="summary by-class"'):]
    table = table[:table.index("</table>")]
    assert "<th>number (first)</th>" in table and "<th>whitespace</th>" not in table   # no such token
    assert "<td>1.00 <small>of 2</small></td>" in table                             # words: 2 of 2
    assert "<td>0.00 <small>of 1</small></td>" in table                             # the first digit


def test_static_files_are_package_data_inlined_in_the_page(tmp_path):
    """CSS and JS live in sstoken/report/static, are found through importlib.resources (as in an
    installed wheel) and are inlined: the page is one file that loads nothing."""
    from importlib import resources

    static = resources.files("sstoken.report").joinpath("static")
    css = static.joinpath("report.css").read_text(encoding="utf-8")
    js = static.joinpath("report.js").read_text(encoding="utf-8")
    assert ".tok.kept.attn{" in css and "function render()" in js
    assert "</script" not in js.lower() and "</style" not in css.lower()
    text = write_html([fake_record(0, n=20)], tmp_path / "r.html").read_text(encoding="utf-8")
    assert f"<style>\n{css}</style>" in text and f"<script>\n{js}</script>" in text
    assert not re.search(r"<link|<script[^>]* src=|@import|url\(", text)     # nothing external
    # the tooltip's fields come from the data, in the schema's order, not from the script
    from sstoken.records import PER_TOKEN_NUMERIC

    assert [k for k, _ in page_data(text)["fields"]] == list(PER_TOKEN_NUMERIC)
    assert "const FIELDS = DATA.fields;" in js and "'rel_norm'" not in js


def test_page_data_round_trips(tmp_path):
    recs = [fake_record(k, m) for k in range(4) for m in ("sstoken", "rho1")]
    recs[0]["rel"][100] = None                                     # a null inside the response
    recs[1]["loss"][-1] = float("nan")                             # non-finite -> null
    recs[2]["score"] = None                                        # a missing field
    back = read_report(write_html(recs, tmp_path / "r.html"))
    assert len(back) == len(recs)
    for a, b in zip(recs, back):
        for k in ("id", "method", "step", "gamma", "rho", "tokens", "response", "keep", "by_attention"):
            assert a[k] == b[k], k
        for k in ("loss", "rel", "rel_norm", "attn_score", "score"):
            if a[k] is None:
                assert k not in b
                continue
            for x, y in zip(a[k], b[k]):
                if x is None or x != x:
                    assert y is None
                else:
                    assert abs(x - y) <= 5e-4 + 1e-9


def test_token_text_cannot_inject_markup(tmp_path):
    evil = ["<script>alert(1)</script>", "</script>", "<!--", " a\"b'", "\n", "<img src=x onerror=alert(1)>",
            "</SCRIPT >", "\u2028", "&amp;"]
    rec = fake_record(0, tokens=evil * 4)
    rec2 = dict(fake_record(1), id="<b>id</b>", method="<i>m</i>")
    text = write_html([rec, rec2], tmp_path / "x.html").read_text()
    before, rest = text.split('<script type="application/json" id="sstoken-data">')
    block, after = rest.split("</script>", 1)
    # inside a script data block only "</script" and "<!--" could end or confuse it
    assert "</" not in block and "<!--" not in block
    assert "alert" not in before and "<b>id</b>" not in before and "<i>m</i>" not in before
    assert after.count("<script>") == 1 and "alert" not in after  # only our code follows
    assert page_data(text) is not None
    assert read_report(tmp_path / "x.html")[0]["tokens"] == evil * 4    # text survives intact


def test_thousand_examples_stay_small(tmp_path):
    """1,000 examples x 200 tokens (150 response tokens, 5 values each) stay under 3 MB.

    Why 3 MB: 750k values at 3 decimals need >= 10 bits each (~0.94 MB) before any token text;
    the page stores ~11 chars per response token (2-3 base-64 digits per value), 2 per token
    index, 1 per state, plus ~200 bytes of metadata per record: ~2.5 MB. A file of this size
    parses in tens of ms; one page (20 examples) is rendered at a time. (Plain JSON numbers and
    token strings took 4.8 MB.)"""
    rng = random.Random(0)
    recs = [fake_record(k, rng=rng) for k in range(1000)]
    t0 = time.perf_counter()
    path = write_html(recs, tmp_path / "big.html")
    secs = time.perf_counter() - t0
    mb = path.stat().st_size / 1e6
    print(f"\n1,000 examples x 200 tokens: {mb:.2f} MB, written in {secs:.2f}s")
    assert mb < 3.0
    recs2 = recs + [dict(fake_record(k, "random", rng=rng, gamma=None), tokens=recs[k]["tokens"])
                    for k in range(1000)]
    mb2 = write_html(recs2, tmp_path / "big2.html").stat().st_size / 1e6
    print(f"1,000 examples x 2 methods: {mb2:.2f} MB (tokens stored once)")
    assert mb2 < 2 * mb - 0.3                                       # shared sequences not repeated


def test_odd_records_and_empty_page(tmp_path):
    a = fake_record(0, n=12)
    a["tokens"][5], a["tokens"][6] = "", "x\r\ny"
    b = fake_record(0, "random", n=15)                          # same id, other tokenization
    c = fake_record(1, n=8)
    c["response"], c["keep"] = [False] * 8, [False] * 8         # no response token at all
    back = read_report(write_html([a, b, c], tmp_path / "o.html"))
    assert [r["tokens"] for r in back] == [a["tokens"], b["tokens"], c["tokens"]]
    assert back[2]["keep"] == [False] * 8 and "loss" not in back[2]
    assert read_report(write_html([], tmp_path / "e.html")) == []


def test_plots_embedded_in_page(tmp_path):
    recs = [fake_record(k) for k in range(2)]
    png = plot_score_histograms(recs, tmp_path / "h.png")
    text = write_html(recs, tmp_path / "r.html", plots={"score <distribution>": png,
                                                        "missing": str(tmp_path / "no.png"), "none": None}).read_text()
    assert text.count("data:image/png;base64,") == 1
    assert "score &lt;distribution&gt;" in text


# --------------------------------------------------------------------------- plots

def _png(path):
    assert path is not None
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    return path


def test_plots(tmp_path):
    recs = [fake_record(k, m, gamma=0.5 if m == "sstoken" else None)
            for k in range(6) for m in ("sstoken", "rho1")]
    _png(plot_score_histograms(recs, tmp_path / "h.png"))
    _png(plot_rel_vs_attn(recs, tmp_path / "sub" / "s.png"))               # makes the folder
    hist = [{"step": s, "loss": 2 - s * 0.1, "learning_rate": 1e-4, "sel/kept_frac": 0.6,
             "sel/rel_mean": 0.1 * s, "sel/attn_mean": 0.3, "sel/rel_attn_corr": -0.2,
             "sel/attn_driven_frac": 0.4} for s in range(1, 6)]
    hist.append({"step": 5, "train_loss": 1.7})                             # HF's final entry
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
    out = plot_training({"a": str(tmp_path / "run"), "b": hist[:3], "c": {"log_history": hist}},
                        tmp_path / "p")
    assert set(out) == {"training loss", "kept fraction", "selection statistics"}
    for p in out.values():
        _png(p)
    rows = [{"method": "sstoken", "gamma": g, "rho": 0.6, "score": 40 + g, "stderr": 1.0}
            for g in (0, 0.5, 1)]
    rows += [{"method": "sstoken", "gamma": 0.5, "rho": 0.6, "score": 41.0, "stderr": 0.5},   # 2 seeds
             {"method": "random", "gamma": 0.5, "score": 39.0}]                               # no stderr
    _png(plot_ablation(rows, "gamma", "score", tmp_path / "a.png"))
    _png(plot_ablation(rows, "rho", "score", tmp_path / "b.png"))


def test_plots_skip_missing_fields(tmp_path):
    bare = [{k: v for k, v in fake_record(k).items()
             if k not in ("score", "rel_norm", "attn_score")} for k in range(2)]
    assert plot_score_histograms(bare, tmp_path / "h.png") is None
    assert plot_rel_vs_attn(bare, tmp_path / "s.png") is None
    assert not (tmp_path / "h.png").exists()
    nulls = [dict(fake_record(0), score=[None] * 200)]
    assert plot_score_histograms(nulls, tmp_path / "h.png") is None
    const = [dict(fake_record(0), score=[0.5] * 200)]                     # one value: one bin
    _png(plot_score_histograms(const, tmp_path / "c.png"))
    assert plot_training({"a": [{"step": 1, "learning_rate": 1e-4}]}, tmp_path / "p") == {}
    out = plot_training({"a": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None},
                               {"loss": 1.0}, {"step": 3, "loss": float("nan")}]}, tmp_path / "p")
    assert set(out) == {"training loss"}
    assert plot_ablation([{"gamma": 1}, {"score": 3}], "gamma", "score", tmp_path / "n.png") is None
    with pytest.raises(ReportError, match="no such trainer state"):
        plot_training({"a": tmp_path / "nowhere"}, tmp_path / "p")


# --------------------------------------------------------------------------- CLI

def test_show_options_and_page(tmp_path, capsys):
    from sstoken.args import parse
    from sstoken.cli import main
    from sstoken.report import show

    s1, s2 = tmp_path / "s.jsonl", tmp_path / "r.jsonl"
    s1.write_text("\n".join(json.dumps(fake_record(k)) for k in range(5)))
    s2.write_text("\n".join(json.dumps(fake_record(k, "random", gamma=None)) for k in range(5)))
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    (run / "trainer_state.json").write_text(json.dumps(
        {"log_history": [{"step": i, "loss": 1.0 / i, "sel/kept_frac": 0.6} for i in range(1, 4)]}))
    argv = ["--scores", str(s1), str(s2), "--trainer-state", f"ss={run}",
            "--trainer-state", str(run / "trainer_state.json"), "--output",
            str(tmp_path / "out" / "rep.html"), "--title", "X", "--max-examples", "3"]
    *_, a = parse("show", argv)
    assert a.scores == [str(s1), str(s2)] and len(a.trainer_state) == 2
    assert main(["show", *argv]) == 0
    recs = read_report(tmp_path / "out" / "rep.html")
    assert sorted({r["id"] for r in recs}) == ["ex0", "ex1", "ex2"] and len(recs) == 6
    text = (tmp_path / "out" / "rep.html").read_text()
    assert text.count("data:image/png;base64,") == 4     # loss, kept fraction, scores, rel vs attn
    assert {p.name for p in (tmp_path / "out" / "rep_plots").iterdir()} >= {"scores.png", "rel_vs_attn.png"}
    # the library function, for callers that build records themselves
    show([fake_record(9)], output=tmp_path / "hook.html")
    assert read_report(tmp_path / "hook.html")[0]["id"] == "ex9"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops")
    capsys.readouterr()
    assert main(["show", "--scores", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1: invalid JSON" in err and "Traceback" not in err


def test_show_cli_from_scores_and_from_model(tmp_path, tiny_dir, records):
    from sstoken.cli import main

    s = tmp_path / "sel.jsonl"
    s.write_text("\n".join(json.dumps(fake_record(k)) for k in range(3)))
    assert main(["show", "--scores", str(s), "--output", str(tmp_path / "a.html")]) == 0
    assert (tmp_path / "a_plots" / "scores.png").exists()
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(4)))
    assert main(["show", "--model", tiny_dir, "--data", str(data), "--methods", "sstoken,random",
                 "--output", str(tmp_path / "b.html")]) == 0
    assert {r["method"] for r in read_report(tmp_path / "b.html")} == {"sstoken", "random"}


# --------------------------------------------------------------------------- browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path, *args):
    exe = shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium")
    if not exe:
        pytest.fail("the browser test needs Debian's headless chromium: "
                    "apt-get update && apt-get install -y chromium (scripts/test.sh does this as root)")
    t0 = time.perf_counter()
    res = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                         capture_output=True, text=True, timeout=180)
    return res, time.perf_counter() - t0


@pytest.mark.browser
def test_page_renders_in_chromium(tmp_path):
    rng = random.Random(1)
    recs = [fake_record(k, rng=rng) for k in range(1000)]
    recs.insert(1, dict(fake_record(0, "random", gamma=None), tokens=recs[0]["tokens"]))
    recs[0]["tokens"][-1] = '<img src=x onerror="document.title=\'pwned\'">'
    recs[1]["tokens"][-1] = recs[0]["tokens"][-1]
    recs[0]["tokens"][-2] = "<script>document.title='pwned'</script>"
    recs[1]["tokens"][-2] = recs[0]["tokens"][-2]
    page = write_html(recs, tmp_path / "r.html", title="sstoken report")
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><title>x</title><p>x</p>")
    _, base = chromium(tmp_path, "--dump-dom", blank.as_uri())          # Chromium's own start-up
    res, secs = chromium(tmp_path, "--dump-dom", page.as_uri())
    dom = res.stdout
    ms = re.search(r'data-render-ms="([\d.]+)"', dom)
    print(f"\nchromium --dump-dom of 1,000 examples ({page.stat().st_size / 1e6:.2f} MB): {secs:.2f}s "
          f"(blank page {base:.2f}s; in-page parse + render of one page "
          f"{ms.group(1) if ms else '?'} ms)")
    assert ms, "the page script did not finish:\n" + res.stderr[-2000:]
    assert "<title>sstoken report</title>" in dom                         # no injected script ran
    assert 'class="legend"' in dom
    rendered = dom.split('<div id="examples">')[1].split('<div id="tip"')[0]
    assert rendered.count('<section class="example">') == 20             # one page, lazily
    assert "page 1 / 50" in dom
    for cls in ("tok kept", "tok kept attn", "tok prompt", "tok drop"):
        assert f'class="{cls}"' in rendered, cls
    assert "&lt;img src=x onerror=" in rendered and "<img" not in rendered
    assert "&lt;script&gt;document.title" in rendered and "<script" not in rendered
    assert '<span class="nl">\u21b5</span>' in rendered                  # newlines shown
    first = rendered.split('<section class="example">')[1]
    assert first.count('<div class="col"') == 2                          # two methods side by side
    assert first.count('class="promptbox') == 1                          # shared prompt shown once
    # interactions, driven by a script appended to a copy of the page: tooltip, filters, pager
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", """<script>
const out = {};
const t = document.querySelector('#examples .tok.kept.attn');
t.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
out.tip = document.getElementById('tip').textContent;
document.querySelector('.next').click();
out.page2 = document.querySelector('.pageinfo').textContent;
const f = document.getElementById('filter'); f.value = 'ex99'; f.dispatchEvent(new Event('input'));
out.filtered = [...document.querySelectorAll('#examples h2')].map(h => h.firstChild.textContent.trim());
f.value = 'ex0'; f.dispatchEvent(new Event('input'));
const random = document.querySelector('#methods input[value="random"]');
random.checked = false; random.dispatchEvent(new Event('change', {bubbles: true}));
out.cols = document.querySelector('#examples section').querySelectorAll('.col').length;
document.body.dataset.probe = JSON.stringify(out);
</script></body>"""))
    res, _ = chromium(tmp_path, "--dump-dom", probe.as_uri())
    m = re.search(r'data-probe="([^"]*)"', res.stdout)
    assert m, res.stderr[-2000:]
    out = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert "kept, mainly because of attention" in out["tip"]
    for label in ("loss", "REL", "norm REL", "attention", "score"):
        assert re.search(rf"^{label} +-?\d+\.\d{{3}}$", out["tip"], re.M), (label, out["tip"])
    assert out["page2"].startswith("page 2 / 50")
    assert out["filtered"] == ["ex99", "ex990", "ex991", "ex992", "ex993", "ex994", "ex995", "ex996",
                               "ex997", "ex998", "ex999"]
    assert out["cols"] == 1                                              # method filter applied
    png = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,1600", "--hide-scrollbars", page.as_uri())
    assert png.exists() and png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000


@pytest.mark.browser
def test_screenshot_script(tmp_path):
    if not shutil.which("chromium"):
        pytest.fail("the browser test needs Debian's headless chromium: "
                    "apt-get update && apt-get install -y chromium")
    page = write_html([fake_record(k, m) for k in range(3) for m in ("sstoken", "random")],
                      tmp_path / "r.html")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "screenshot_report.sh")
    res = subprocess.run(["bash", script, str(page), str(tmp_path / "shot.png"), "1000x800"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "shot.png").read_bytes()[:8] == PNG_MAGIC


def test_weights_set_the_colour_intensity_in_chromium(tmp_path):
    """With --weighting, a kept token's background is as intense as its weight (0.15 + 0.85 w),
    and the tooltip lists the weight; unweighted pages are unchanged."""
    rec = fake_record(0, n=12)
    rec["weight"] = [None if not r else (0.5 if k else 0.0) for r, k in zip(rec["response"], rec["keep"])]
    page = write_html([rec], tmp_path / "w.html")
    res, _ = chromium(tmp_path, "--dump-dom", page.as_uri())
    rendered = res.stdout.split('<div id="examples">')[1].split('<div id="tip"')[0]
    kept = re.findall(r'<span class="tok kept[^"]*" data-i="\d+"([^>]*)>', rendered)
    assert kept and all("rgba(" in k and ",0.57)" in k for k in kept), kept[:3]
    assert "style=" not in "".join(re.findall(r'<span class="tok (?:drop|prompt)"[^>]*>', rendered))
    plain = write_html([fake_record(0, n=12)], tmp_path / "p.html")
    res, _ = chromium(tmp_path, "--dump-dom", plain.as_uri())
    rendered = res.stdout.split('<div id="examples">')[1].split('<div id="tip"')[0]
    assert 'class="tok kept"' in rendered and "style=" not in rendered
