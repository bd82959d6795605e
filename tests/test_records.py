"""The record schema (sstoken.records): the field tuples, checks that name the file and line,
the derived ``by_attention``, and write_scores -> read_scores."""
import json
import os
import stat

import pytest
from fake_scores import fake_record

from sstoken import records
from sstoken.records import (PER_TOKEN, PER_TOKEN_BOOL, PER_TOKEN_NUMERIC, REQUIRED, SCALAR_FIELDS,
                             ReportError, check_record, derive_by_attention, read_scores, token_states,
                             write_scores)


def test_field_tuples():
    assert SCALAR_FIELDS == ("id", "method", "step", "gamma", "rho")
    assert REQUIRED == ("id", "method", "tokens", "response", "keep")
    assert PER_TOKEN_BOOL == ("response", "keep", "by_attention")
    assert PER_TOKEN_NUMERIC == ("loss", "rel", "rel_norm", "attn_score", "attn_norm", "score", "weight")
    assert PER_TOKEN == PER_TOKEN_BOOL + PER_TOKEN_NUMERIC
    rec = fake_record(0, n=10)    # the trainer's record ("weight" with --weighting, "attn_norm" with rank)
    assert set(rec) | {"weight", "attn_norm"} == set(SCALAR_FIELDS) | {"tokens"} | set(PER_TOKEN)


def test_schema_is_pure_python():
    """The trainer imports it to write; the report reads with it: no torch, no matplotlib."""
    import subprocess
    import sys

    code = ("import sys, sstoken.records, sstoken.report; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_read_scores_several_files_and_single_path(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps(fake_record(k)) for k in range(3)) + "\n\n")
    b.write_text(json.dumps(fake_record(0, "random", gamma=None)) + "\n")
    recs = read_scores([a, str(b)])
    assert [(r["id"], r["method"]) for r in recs] == [("ex0", "sstoken"), ("ex1", "sstoken"),
                                                      ("ex2", "sstoken"), ("ex0", "random")]
    assert len(read_scores(str(a))) == 3                      # one path, not its characters


def test_bad_scores_files_name_file_and_line(tmp_path):
    p = tmp_path / "s.jsonl"
    good = fake_record(0, n=10)
    cases = [
        (json.dumps(good) + "\n{oops\n", r"s\.jsonl:2: invalid JSON"),
        (json.dumps(dict(good, keep=[True])), r"s\.jsonl:1: field 'keep' has 1 values for 10 tokens"),
        (json.dumps({"id": "x", "method": "m"}), r"s\.jsonl:1: missing field\(s\) tokens, response, keep"),
        ("[1, 2]", r"s\.jsonl:1: expected a JSON object"),
        (json.dumps(dict(good, score=["high"] * 10)), r"s\.jsonl:1: field 'score' must hold numbers"),
        (json.dumps(dict(good, loss=3.0)), r"s\.jsonl:1: field 'loss' must be a list"),
        (json.dumps(dict(good, tokens=[1] * 10)), r"s\.jsonl:1: field 'tokens' must be a list of strings"),
    ]
    for text, msg in cases:
        p.write_text(text)
        with pytest.raises(ReportError, match=msg):
            read_scores([p])
    with pytest.raises(ReportError, match="nope.jsonl: no such file"):
        read_scores([tmp_path / "nope.jsonl"])


def test_check_record_fills_optional_fields():
    rec = fake_record(0, n=12)
    want = rec.pop("by_attention")
    for k in ("loss", "rel", "step"):
        rec.pop(k)
    out = check_record(dict(rec, id=7, tokens=None))
    assert out["id"] == "7" and out["tokens"][0] == "\u27e80\u27e9"
    assert out["by_attention"] == want                # derived from gamma, rel_norm, attn_score
    assert check_record(dict(rec, gamma=None))["by_attention"] == [False] * 12
    assert derive_by_attention(rec) == want and derive_by_attention(dict(rec, gamma=None)) == [False] * 12


def test_token_states():
    rec = {"response": [False, True, True, True], "keep": [False, False, True, True],
           "by_attention": [False, False, False, True]}
    assert token_states(rec) == "pdka"


# --------------------------------------------------------------------------- write_scores

def test_write_scores_then_read_scores_round_trips(tmp_path):
    recs = [fake_record(0, n=12), fake_record(1, "random", n=9, gamma=None)]
    recs[0]["tokens"][3] = "caf\u00e9 \u2028 \r\n <\"x\">"            # non-ASCII, separators, quotes
    recs[0]["loss"][-1] = None
    raw = dict(fake_record(2, n=6), tokens=None)                   # no tokenizer at training time
    del raw["by_attention"]
    path = write_scores(tmp_path / "run" / "selection.jsonl", recs + [raw])
    assert path == tmp_path / "run" / "selection.jsonl"            # the folder is created
    assert [p.name for p in path.parent.iterdir()] == ["selection.jsonl"]   # no temporary left
    umask = os.umask(0o22)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask     # not mkstemp's 0600
    lines = path.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[-1] == ""                      # one line per record
    assert json.loads(lines[2]) == raw                              # written as given
    back = read_scores(path)
    assert back[:2] == recs
    assert back[2] == check_record(raw)                             # placeholders, derived flags
    assert back[2]["tokens"][0] == "\u27e80\u27e9"


def test_write_scores_checks_first_and_leaves_the_file(tmp_path):
    path = tmp_path / "selection.jsonl"
    write_scores(path, [fake_record(0, n=5)])
    before = path.read_text()
    with pytest.raises(ReportError, match=r"selection\.jsonl: record 1: field 'keep' has 1 values for 5 tokens"):
        write_scores(path, [fake_record(0, n=5), dict(fake_record(1, n=5), keep=[True])])
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["selection.jsonl"]


def test_a_new_per_token_number_needs_one_name(monkeypatch, tmp_path):
    """Adding a per-token number (as ``weight`` was added for --weighting; here a made-up
    ``margin``) is one name in PER_TOKEN_NUMERIC: it is then checked, written, read, carried on
    the page with its tooltip label, and decoded."""
    from sstoken.report import read_report, write_html

    monkeypatch.setattr(records, "PER_TOKEN_NUMERIC", PER_TOKEN_NUMERIC + ("margin",))
    monkeypatch.setattr(records, "PER_TOKEN", PER_TOKEN + ("margin",))
    rec = fake_record(0, n=8)
    rec["margin"] = [None, None] + [0.25 * i for i in range(6)]
    with pytest.raises(ReportError, match="field 'margin' has 7 values for 8 tokens"):
        check_record(dict(rec, margin=rec["margin"][1:]))
    back = read_scores(write_scores(tmp_path / "s.jsonl", [rec]))
    assert back[0]["margin"] == rec["margin"]
    page = write_html(back, tmp_path / "r.html")
    text = page.read_text()
    assert '["margin","margin"]' in text and "combined score, token weight (--weighting), margin<" in text
    assert read_report(page)[0]["margin"] == rec["margin"]


def test_token_classes_and_kept_by_class():
    from sstoken.records import kept_by_class, token_class

    assert token_class("<|im_end|>") == "template" and token_class("</s>") == "template"
    assert token_class(" 4") == "number (first)" and token_class("2", " 4") == "number (later)"
    assert token_class("5", " apples") == "number (first)" and token_class(" apples") == "word"
    assert token_class(".") == "punctuation" and token_class("$") == "punctuation"
    assert token_class("\n") == "whitespace" and token_class("< 3") == "number (first)"
    rec = {"tokens": ["Q", " has", " 1", "2", " cats", ".", "<|im_end|>"],
           "response": [False, True, True, True, True, True, True],
           "keep": [False, True, False, True, True, False, True]}
    got = kept_by_class([rec, {"tokens": None, "response": [True], "keep": [True]}])
    assert got["word"] == (2, 2) and got["number (first)"] == (0, 1) and got["number (later)"] == (1, 1)
    assert got["punctuation"] == (0, 1) and got["template"] == (1, 1) and got["whitespace"] == (0, 0)
