"""The selection report: page structure, escaping, size, plots, bad input; and in Chromium."""
import json
import os
import random
import shutil
import subprocess
import time

import pytest

from sstoken.report import (ReportError, plot_ablation, plot_rel_vs_attn, plot_score_histograms,
                            plot_training, read_scores, write_html)


def fake_record(k, method="sstoken", n=200, rng=None, tokens=None):
    rng = rng or random.Random(k)
    tokens = tokens or [rng.choice(["the", " sea", " is", " 5", ".", "\n", " blue", " eggs"]) for _ in range(n)]
    n = len(tokens)
    p = n // 4
    resp = [i >= p for i in range(n)]
    keep = [r and rng.random() < 0.6 for r in resp]
    attn = [rng.random() if r else None for r in resp]
    reln = [rng.random() if r else None for r in resp]
    return {"id": f"ex{k}", "method": method, "step": 3, "gamma": 0.5, "rho": 0.6, "tokens": tokens,
            "response": resp, "keep": keep,
            "loss": [rng.random() * 4 if r else None for r in resp],
            "rel": [rng.gauss(0, 1) if r else None for r in resp], "rel_norm": reln,
            "attn_score": attn, "score": [0.5 * a + 0.5 * b if r else None for a, b, r in zip(reln, attn, resp)],
            "by_attention": [k_ and a > b for k_, a, b in zip(keep, [x or 0 for x in attn], [x or 0 for x in reln])]}


def test_page_structure_side_by_side_and_legend(tmp_path):
    recs = [fake_record(k, m) for k in range(3) for m in ("sstoken", "random")]
    path = write_html(recs, tmp_path / "r.html", title="T")
    text = path.read_text()
    assert 'class="legend"' in text and "tok kept attn" in text and "tok prompt" in text
    data = json.loads(text.split('id="sstoken-data">')[1].split("</script>")[0].replace("<\\/", "</"))
    assert set(data["examples"]) == {"ex0", "ex1", "ex2"}
    assert [r["method"] for r in data["runs"] if r["id"] == "ex1"] == ["sstoken", "random"]
    r0 = data["runs"][0]
    assert len(r0["state"]) == 200 and set(r0["state"]) <= set("pdka")
    assert len(r0["v"]["loss"]) == r0["state"].count("d") + r0["state"].count("k") + r0["state"].count("a")
    assert not list(tmp_path.glob("*.tmp"))


def test_token_text_cannot_inject_markup(tmp_path):
    rec = fake_record(0, tokens=["<script>alert(1)</script>", "</script>", "<!--", " a\"b'", "\n"] * 4)
    text = write_html([rec], tmp_path / "x.html").read_text()
    body = text.split('id="sstoken-data">')[1]
    data_block = body.split("</script>")[0]
    # inside a script data block only "</script" and "<!--" could break out; both are escaped
    assert "</script" not in data_block and "<!--" not in data_block
    data = json.loads(data_block)
    assert data["examples"]["ex0"][0] == "<script>alert(1)</script>"     # text survives intact


def test_thousand_examples_stay_small(tmp_path):
    rng = random.Random(0)
    recs = [fake_record(k, rng=rng) for k in range(1000)]
    path = write_html(recs, tmp_path / "big.html")
    mb = path.stat().st_size / 1e6
    print(f"1,000 examples x 200 tokens: {mb:.2f} MB")
    # 200k tokens with 5 numbers per response token: a few MB; rendered 20 examples at a time
    assert mb < 5


def test_plots(tmp_path):
    recs = [fake_record(k, m) for k in range(4) for m in ("sstoken", "rho1")]
    assert os.path.getsize(plot_score_histograms(recs, tmp_path / "h.png")) > 1000
    assert os.path.getsize(plot_rel_vs_attn(recs, tmp_path / "s.png")) > 1000
    hist = [{"step": s, "loss": 2 - s * 0.1, "sel/kept_frac": 0.6} for s in range(1, 6)]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
    out = plot_training({"a": str(tmp_path / "run"), "b": hist}, tmp_path / "p")
    assert set(out) == {"loss", "kept_frac"} and all(os.path.getsize(p) > 1000 for p in out.values())
    rows = [{"method": "sstoken", "gamma": g, "score": 40 + g, "stderr": 1.0} for g in (0, 0.5, 1)]
    assert os.path.getsize(plot_ablation(rows, "gamma", "score", tmp_path / "a.png")) > 1000
    assert plot_ablation([{"gamma": 1}], "gamma", "score", tmp_path / "none.png") is None


def test_bad_scores_files(tmp_path):
    p = tmp_path / "s.jsonl"
    good = fake_record(0, n=10)
    p.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ReportError, match=r"s.jsonl:2: invalid JSON"):
        read_scores([p])
    bad = dict(good, keep=[True])
    p.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ReportError, match=r"s.jsonl:1: field 'keep' has 1 values for 10 tokens"):
        read_scores([p])
    p.write_text(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(ReportError, match="missing field"):
        read_scores([p])


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
    text = (tmp_path / "b.html").read_text()
    assert '"method":"sstoken"' in text and '"method":"random"' in text


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path, *args):
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("Debian chromium is needed: apt-get install -y chromium (scripts/test.sh does this)")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.browser
def test_page_renders_in_chromium(tmp_path):
    recs = [fake_record(k, m) for k in range(1000) for m in ("sstoken",)]
    recs += [fake_record(0, "random")]
    recs[0]["tokens"][-1] = '<img src=x onerror="document.title=1">'          # must stay text
    page = write_html(recs, tmp_path / "r.html")
    t0 = time.time()
    dom = chromium(tmp_path, "--dump-dom", f"file://{page}").stdout
    print(f"chromium load + render of 1,000 examples: {time.time() - t0:.2f}s "
          f"({page.stat().st_size / 1e6:.2f} MB)")
    assert 'class="legend"' in dom
    rendered = dom.split('<div id="examples">')[1].split('<div id="tip"')[0]
    assert rendered.count('<section class="example">') == 20        # one page rendered, lazily
    assert 'class="tok kept"' in rendered and 'class="tok kept attn"' in rendered
    assert 'class="tok prompt"' in rendered and 'class="tok drop"' in rendered
    assert "page 1 / 50" in dom
    assert "&lt;img src=x onerror" in rendered and "<img" not in rendered
    first = rendered.split('<section class="example">')[1]
    assert first.count('<div class="col">') == 2                     # two methods side by side
    png = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,1600", f"file://{page}")
    assert png.exists() and png.stat().st_size > 10_000
