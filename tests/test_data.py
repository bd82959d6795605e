import json

import pytest
import torch

from sstoken.data import (IGNORE_INDEX, Collator, DataError, ExampleDataset, build_examples,
                          load_examples, render_tulu, to_messages, tokenize_messages)


def trained_text(tok, ids, labels):
    return tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])


def write_jsonl(path, recs):
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return str(path)


def test_three_formats_give_the_same_messages():
    a = to_messages({"messages": [{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Yo"}]}, "x")
    b = to_messages({"prompt": "Hi", "completion": "Yo"}, "x")
    c = to_messages({"instruction": "Hi", "output": "Yo"}, "x")
    assert a == b == c
    d = to_messages({"instruction": "Hi", "input": "there", "output": "Yo"}, "x")
    assert d[0]["content"] == "Hi\n\nthere"


def test_tulu_template_and_masking_multi_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "It is 5."},
            {"role": "user", "content": "And 4+5?"},
            {"role": "assistant", "content": "Then 9."}]
    text, spans = render_tulu(msgs, tok.eos_token)
    assert text == ("<|system|>\nBe brief.\n<|user|>\nWhat is 2+3?\n<|assistant|>\nIt is 5."
                    "<|im_end|>\n<|user|>\nAnd 4+5?\n<|assistant|>\nThen 9.<|im_end|>\n")
    ids, labels = tokenize_messages(msgs, tok)
    assert tok.decode(ids) == text
    # every assistant turn is trained, nothing else
    assert trained_text(tok, ids, labels) == "It is 5.<|im_end|>\nThen 9.<|im_end|>\n"
    assert labels[0] == IGNORE_INDEX


def test_chat_template_masking(tok):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now."}]
    ids, labels = tokenize_messages(msgs, tok, template="chat")
    assert "<|im_start|>user" in tok.decode(ids)
    assert trained_text(tok, ids, labels) == "Hello!<|im_end|>\nBye now.<|im_end|>\n"


def test_truncation_and_dropping(tok):
    recs = [("r0", {"prompt": "a " * 40, "completion": "b b b"}),       # response cut away
            ("r1", {"prompt": "hi", "completion": "the sea is wide " * 10})]  # truncated
    ex, st = build_examples(recs, tok, max_seq_length=20)
    assert st.dropped_no_response == 1 and st.truncated == 2 and st.examples == 1
    assert len(ex[0].input_ids) == 20 and ex[0].num_response_tokens > 0


@pytest.mark.parametrize("content, msg", [
    ('{"prompt": "x"', "invalid JSON"),
    ('{"prompt": "x"}', "'completion' is missing"),
    ('{"prompt": "x", "completion": "  "}', "'completion' is empty"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
     "first message is from the assistant"),
    ('{"text": "x"}', "unknown record format"),
    ('{"prompt": 3, "completion": "y"}', "must be a string"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, tok, content, msg):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ok", "completion": "fine"}\n' + content + "\n")
    with pytest.raises(DataError) as e:
        load_examples(str(p), tok)
    assert f"{p}:2" in str(e.value) and msg in str(e.value)


def test_non_utf8_is_reported_with_line(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "ok", "completion": "fine"}\n{"prompt": "\xff", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        load_examples(str(p), tok)


def test_skip_invalid_counts(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ok", "completion": "fine"}\n{"prompt": "x"}\n'
                 '{"messages": [{"role": "bot", "content": "x"}]}\n{"prompt": "a", "completion": "b"}\n')
    ex, st = load_examples(str(p), tok, skip_invalid=True)
    assert st.invalid == 2 and st.examples == 2 and len(st.invalid_reasons) == 2


def test_json_list_and_datasets_folder(tmp_path, tok):
    import datasets

    recs = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say yo", "output": "yo"}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    ex1, _ = load_examples(str(tmp_path / "d.json"), tok)
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    ex2, _ = load_examples(str(tmp_path / "ds"), tok)
    assert [e.input_ids for e in ex1] == [e.input_ids for e in ex2]
    assert [e.id for e in ex1] == [e.id for e in ex2]          # content-hash ids are stable


def test_ids_stable_under_reordering_and_duplicates(tmp_path, tok):
    recs = [{"prompt": f"q{k}", "completion": f"a{k}"} for k in range(3)] + [{"prompt": "q0", "completion": "a0"}]
    ex1, _ = load_examples(write_jsonl(tmp_path / "a.jsonl", recs), tok)
    ex2, _ = load_examples(write_jsonl(tmp_path / "b.jsonl", recs[::-1][1:] + [recs[0]]), tok)
    assert len({e.id for e in ex1}) == 4
    assert {e.id: e.input_ids for e in ex1}[ex1[1].id] == {e.id: e.input_ids for e in ex2}[ex1[1].id]
    assert ex1[3].id == ex1[0].id + "#1"


def test_missing_file(tok):
    with pytest.raises(DataError, match="no such file"):
        load_examples("/nonexistent/x.jsonl", tok)


def test_collator_pads_right(tok, records):
    ex, _ = build_examples(((str(k), r) for k, r in enumerate(records(3))), tok)
    ex[0].extra["history_loss"] = [0.5] * len(ex[0].input_ids)
    for e in ex[1:]:
        e.extra["history_loss"] = [1.0] * len(e.input_ids)
    batch = Collator(tok.pad_token_id, pad_to_multiple_of=8)([ExampleDataset(ex)[k] for k in range(3)])
    B, L = batch["input_ids"].shape
    assert B == 3 and L % 8 == 0
    for b, e in enumerate(ex):
        n = len(e.input_ids)
        assert batch["attention_mask"][b].sum() == n
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["input_ids"][b, :n].tolist() == e.input_ids
    assert batch["history_loss"].dtype == torch.float32 and batch["index"].tolist() == [0, 1, 2]


def test_embedded_gsm8k_records():
    from sstoken.embedded import gsm8k_records

    recs = list(gsm8k_records())
    assert len(recs) == 1319
    where, r = recs[0]
    assert "<<" not in r["completion"] and "#### 18" in r["completion"]
