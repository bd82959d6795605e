"""A corpus of bad inputs (tests/bad_inputs/) and misused options, through the real command
line: every expected failure exits with its documented code, prints one message that names the
file and line (or the option), prints no traceback, and leaves nothing half-written (no output
folder, no cache entry, no page). ``--skip_invalid`` skips every kind of bad record, parse
errors included, and lists them in ``skipped.jsonl``."""
import json
from pathlib import Path

import pytest
import yaml

from sstoken.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"

# file -> (where the message points: ":line", "[record i]" or "" for the file, what it says,
#          how many good records --skip_invalid keeps: None = the file cannot be skipped through)
DATA_CASES = {
    "invalid_json.jsonl": (":2", "invalid JSON", 2),
    "truncated_last_line.jsonl": (":3", "invalid JSON", 2),
    "not_utf8.jsonl": (":2", "not valid UTF-8", 2),
    "nul_byte.jsonl": (":2", "invalid JSON", 2),
    "utf16.jsonl": (":1", "not valid UTF-8", 0),
    "empty.jsonl": ("", "no usable examples", None),
    "blank_lines.jsonl": ("", "no usable examples", None),
    "missing_field.jsonl": (":2", "'completion' is missing", 2),
    "empty_completion.jsonl": (":2", "'completion' is empty", 2),
    "wrong_type.jsonl": (":2", "must be a string", 2),
    "unknown_role.jsonl": (":2", "role 'robot'", 2),
    "no_assistant.jsonl": (":2", "no assistant message", 2),
    "assistant_first.jsonl": (":2", "first message is from the assistant", 2),
    "unknown_format.jsonl": (":2", "unknown record format", 2),
    "not_object.jsonl": (":2", "expected a JSON object", 2),
    "messages_not_list.jsonl": (":2", "'messages' must be a non-empty list", 2),
    "message_missing_content.jsonl": (":2", "must be an object with 'role' and 'content'", 2),
    "empty_messages.jsonl": (":2", "'messages' must be a non-empty list", 2),
    "content_not_string.jsonl": (":3", "must be a string", 2),
    "negative_weight.jsonl": (":2", "messages[1].weight must be a number >= 0, got -0.5", 2),
    "overlapping_spans.jsonl": (":2", "messages[1].spans: [0, 6) and [4, 9) overlap", 2),
    "bad_json_list.json": (":4", "invalid JSON", None),
    "json_scalar.json": ("", "expected a JSON list of records", None),
    "json_object_two_lists.json": ("", "expected a JSON list", None),
    "corrupt.jsonl.gz": ("", "cannot be read", None),
    "cut.jsonl.gz": ("", "cannot be read", None),
}
GOOD = ("bom.jsonl", "crlf.jsonl")          # a byte-order mark and Windows line ends are fine


def test_the_corpus_is_complete():
    files = {p.name for p in CORPUS.iterdir()}
    assert files == set(DATA_CASES) | set(GOOD) and len(files) >= 20


def run(argv, capsys):
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def common(tiny_dir, tmp_path):
    return ["--model", tiny_dir, "--cache_dir", str(tmp_path / "cache")]


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_data_train_score_show(name, tiny_dir, tmp_path, capsys):
    where, what, _ = DATA_CASES[name]
    path = CORPUS / name
    cmds = {
        "train": ["train", *common(tiny_dir, tmp_path), "--data", str(path), "--max_steps", "1",
                  "--use_cpu", "true", "--output_dir", str(tmp_path / "out")],
        "score": ["score", *common(tiny_dir, tmp_path), "--data", str(path)],
        "show": ["show", *common(tiny_dir, tmp_path), "--data", str(path), "--output",
                 str(tmp_path / "page.html")],
    }
    for cmd, argv in cmds.items():
        rc, text = run(argv, capsys)
        assert rc == 1, (cmd, text)
        assert f"{path}{where}" in text and what in text, (cmd, text)
        assert "Traceback" not in text and text.count("error:") == 1, (cmd, text)
    assert not (tmp_path / "out").exists()                       # no half-made output folder
    assert not (tmp_path / "cache" / "losses").exists() or not any((tmp_path / "cache" / "losses").iterdir())
    assert not (tmp_path / "page.html").exists()


@pytest.mark.parametrize("name", sorted(n for n, c in DATA_CASES.items() if c[2]))
def test_skip_invalid_skips_every_kind(name, tiny_dir, tmp_path):
    where, what, kept = DATA_CASES[name]
    from sstoken.data import load_examples
    from sstoken.modeling import load_tokenizer

    ex, stats = load_examples(str(CORPUS / name), load_tokenizer(tiny_dir), skip_invalid=True)
    assert len(ex) == kept and stats.invalid == 1
    assert stats.skipped[0]["file"] == str(CORPUS / name) and f":{stats.skipped[0]['line']}" == where
    assert what in stats.skipped[0]["reason"]


def test_skip_invalid_writes_skipped_jsonl(tiny_dir, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"".join((CORPUS / n).read_bytes() for n in
                              ("invalid_json.jsonl", "not_utf8.jsonl", "missing_field.jsonl")))
    out = tmp_path / "out"
    rc, text = run(["train", *common(tiny_dir, tmp_path), "--data", str(data), "--skip_invalid", "true",
                    "--max_steps", "1", "--use_cpu", "true", "--lora_r", "4", "--output_dir", str(out)], capsys)
    assert rc == 0, text
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["reason"].split(" (")[0]) for s in skipped] == \
        [(2, "invalid JSON"), (5, "not valid UTF-8"), (8, "field 'completion' is missing")]
    assert all(s["file"] == str(data) for s in skipped)
    assert "3 invalid skipped" in text and f"{data}:2: invalid JSON" in text
    assert json.loads((out / "sstoken_run.json").read_text())["skipped"] == str(out / "skipped.jsonl")


@pytest.mark.parametrize("name", GOOD)
def test_bom_and_crlf_are_read(name, tiny_dir):
    from sstoken.data import load_examples
    from sstoken.modeling import load_tokenizer

    ex, stats = load_examples(str(CORPUS / name), load_tokenizer(tiny_dir))
    assert len(ex) == 2 and stats.invalid == 0
    assert ex[0].id == load_examples(str(CORPUS / "invalid_json.jsonl"), load_tokenizer(tiny_dir),
                                     skip_invalid=True)[0][0].id


def test_bad_scores_files_for_show(tmp_path, capsys):
    cases = {"bad.jsonl": ("{oops\n", ":1: invalid JSON"),
             "missing.jsonl": (json.dumps({"id": 1}) + "\n", ":1: missing field"),
             "length.jsonl": (json.dumps({"id": 1, "method": "m", "tokens": ["a", "b"], "response": [True],
                                          "keep": [True, False]}) + "\n", ":1: field 'response' has 1 values")}
    for name, (content, msg) in cases.items():
        (tmp_path / name).write_text(content)
        rc, text = run(["show", "--scores", str(tmp_path / name), "--output", str(tmp_path / "p.html")], capsys)
        assert rc == 1 and f"{tmp_path / name}{msg}" in text and "Traceback" not in text, text
    rc, text = run(["show", "--scores", str(tmp_path / "nowhere.jsonl")], capsys)
    assert rc == 1 and "nowhere.jsonl: no such file" in text
    assert not (tmp_path / "p.html").exists()


def test_option_misuse(tiny_dir, tmp_path, capsys):
    """Option errors exit 2 before any data is read or model loaded, naming the option."""
    data = CORPUS / "bom.jsonl"
    base = ["train", "--model", tiny_dir, "--data", str(data), "--use_cpu", "true"]
    (tmp_path / "list.yaml").write_text(yaml.safe_dump({"rho": [0.5]}))
    (tmp_path / "bad.yaml").write_text("rho: 0.5\n  x: [\n")
    (tmp_path / "afile").write_text("x")
    notadapter = tmp_path / "notadapter"
    notadapter.mkdir()
    cases = [
        (["--config", str(tmp_path / "list.yaml")], "option rho must be a single value"),
        (["--config", str(tmp_path / "bad.yaml")], "not valid YAML"),
        (["--config", str(tmp_path / "none.yaml")], "none.yaml: no such file"),
        (["--config"], "--config needs a file name"),
        (["--attn_layer", "999"], "attn_layer 999 is out of range for a model with 2 layers"),
        (["--max_seq_length", "0"], "--max_seq_length must be >= 2"),
        (["--output_dir", str(tmp_path / "afile")], "is a file, not a folder"),
        (["--resume_from_checkpoint", "true", "--output_dir", str(tmp_path / "fresh")], "has no complete checkpoint"),
        (["--resume_from_checkpoint", str(tmp_path)], "not a complete sstoken checkpoint"),
        (["--model", str(tmp_path / "nomodel")], "not a model folder"),
        (["--data", "nosuchfile"], "nosuchfile: no such file"),
        (["--method", "rho1"], "--method rho1 needs --ref_model"),
        (["--history", "ema", "--history_losses", str(tmp_path)], "--history ema computes history losses online"),
    ]
    for extra, msg in cases:
        out = ["--output_dir", str(tmp_path / "o")] if "--output_dir" not in extra else []
        rc, text = run([*base, *out, *extra], capsys)
        want = 1 if "nosuchfile" in msg else 2
        assert rc == want and msg in text and "Traceback" not in text, (extra, rc, text)
        assert not (tmp_path / "o").exists() and not (tmp_path / "fresh").exists()
    for cmd in (["eval", "--adapter", str(notadapter)],
                ["merge", "--model", tiny_dir, "--adapter", str(notadapter), "--output", str(tmp_path / "m")],
                ["show", "--adapter", str(tmp_path / "none")]):
        rc, text = run(cmd, capsys)
        assert rc == 2 and "--adapter" in text and "Traceback" not in text, (cmd, text)
    assert not (tmp_path / "m").exists()
    nomodel = str(tmp_path / "nomodel")
    for cmd in (["score", "--model", nomodel], ["show", "--model", nomodel, "--output", str(tmp_path / "p.html")],
                ["eval", "--model", nomodel, "--output_dir", str(tmp_path / "ev")],
                ["merge", "--model", nomodel, "--adapter", str(notadapter.parent / "ad"), "--output", str(tmp_path / "m")]):
        if cmd[0] == "merge":
            (tmp_path / "ad").mkdir(exist_ok=True)
            (tmp_path / "ad" / "adapter_config.json").write_text("{}")
        rc, text = run(cmd, capsys)
        assert rc == 2 and f"--model {nomodel}: not a model folder" in text and "Traceback" not in text, (cmd, text)
    assert not (tmp_path / "ev").exists() and not (tmp_path / "p.html").exists() and not (tmp_path / "m").exists()


def test_rerun_into_an_earlier_run_is_refused_or_replaced(tiny_dir, tmp_path, capsys):
    args = ["train", "--model", tiny_dir, "--data", str(CORPUS / "bom.jsonl"), "--use_cpu", "true",
            "--lora_r", "4", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
            "--output_dir", str(tmp_path / "o")]
    assert run(args, capsys)[0] == 0
    assert (tmp_path / "o" / "checkpoint-1").is_dir()
    rc, text = run(args, capsys)
    assert rc == 2 and "holds an earlier run" in text and "--resume_from_checkpoint true" in text
    rc, text = run(args[:-6] + ["--max_steps", "1", "--output_dir", str(tmp_path / "o"),
                                "--overwrite_output_dir", "true"], capsys)
    assert rc == 0, text
    assert not (tmp_path / "o" / "checkpoint-2").exists()         # the old checkpoints are gone


def test_ctrl_c_exits_130_and_says_what_was_kept(tiny_dir, tmp_path, capsys, monkeypatch):
    import sstoken.runs

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sstoken.runs, "train", interrupted)
    rc, text = run(["train", "--model", tiny_dir, "--output_dir", str(tmp_path / "o")], capsys)
    assert rc == 130 and "interrupted; no checkpoint was written" in text and "Traceback" not in text
    ckpt = tmp_path / "o" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "sstoken_state.json").write_text("{}")
    rc, text = run(["train", "--model", tiny_dir, "--output_dir", str(tmp_path / "o")], capsys)
    assert rc == 130 and f"the last complete checkpoint is {ckpt}" in text


def test_failed_eval_leaves_no_folder(tiny_dir, tmp_path, capsys, monkeypatch):
    import sstoken.evaluation

    def broken(**kw):
        (tmp_path / "ev" / "tasks").mkdir(parents=True)
        raise FileNotFoundError("no .arrow files in /x")

    monkeypatch.setattr(sstoken.evaluation, "evaluate", broken)
    rc, text = run(["eval", "--model", tiny_dir, "--output_dir", str(tmp_path / "ev")], capsys)
    assert rc == 1 and "no .arrow files" in text and not (tmp_path / "ev").exists()


def test_more_option_misuse(tiny_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rho: 0.5\nmax_samples: null\nlearning_rate: null\n")
    base = ["train", "--model", tiny_dir, "--data", str(CORPUS / "bom.jsonl"), "--use_cpu", "true",
            "--output_dir", str(tmp_path / "o")]
    for extra, msg in [([f"--config={cfg}"], "option learning_rate has no value (null)"),
                       (["--conf", str(cfg)], "write --config in full"),
                       (["--remove_unused_columns", "true"], "--remove_unused_columns must stay false"),
                       (["--eval_strategy", "steps"], "`sstoken train` has no evaluation set"),
                       (["--lora_target_modules", "q_proj,lm_head"], "--lora_target_modules lm_head")]:
        rc, text = run([*base, *extra], capsys)
        assert rc == 2 and msg in text and "Traceback" not in text, (extra, text)
    assert not (tmp_path / "o").exists()
    cfg.write_text("rho: 0.5\nmax_samples: null\n")                 # null for a None default is fine
    from sstoken.args import parse

    assert parse("train", [f"--config={cfg}"])[3].rho == 0.5


def test_a_step_that_keeps_nothing_leaves_the_weights_finite(tok, tmp_path):
    import torch
    from transformers import TrainingArguments

    from sstoken.args import SelectionArguments
    from sstoken.data import Collator, ExampleDataset, build_examples
    from sstoken.testing import tiny_llama
    from sstoken.trainer import SelectionTrainer

    ex, _ = build_examples(((f"r{k}", {"prompt": "the sea", "completion": "is wide and blue"}) for k in range(4)), tok)
    for e in ex:
        e.extra["keep"] = [0.0] * len(e.input_ids)               # TokenCleaning kept none of them
    model = tiny_llama(len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", remove_unused_columns=False,
                             use_cpu=True, max_steps=1, per_device_train_batch_size=4, learning_rate=0.1)
    t = SelectionTrainer(model=model, args=args, train_dataset=ExampleDataset(ex),
                         data_collator=Collator(tok.pad_token_id), processing_class=tok,
                         selection=SelectionArguments(method="tokencleaning", ref_model="x", save_scores=0))
    t.train()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p, before[n]), n


def test_chat_template_weights_find_the_content_not_the_role_header(tok):
    from sstoken.data import tokenize_messages

    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "a", "spans": [{"start": 0, "end": 1, "weight": 3.0}]}]
    ids, labels, w = tokenize_messages(msgs, tok, template="chat")
    heavy = [tok.decode([i]) for i, x in zip(ids, w) if x == 3.0]
    assert heavy == ["a"]                                 # not the "a" of "<|im_start|>assistant"
