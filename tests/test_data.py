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
    ids, labels, weights = tokenize_messages(msgs, tok)
    assert weights is None                                   # no weights in the data
    assert tok.decode(ids) == text
    # every assistant turn is trained, nothing else
    assert trained_text(tok, ids, labels) == "It is 5.<|im_end|>\nThen 9.<|im_end|>\n"
    assert labels[0] == IGNORE_INDEX


def test_chat_template_masking(tok):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now."}]
    ids, labels, _ = tokenize_messages(msgs, tok, template="chat")
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


def test_embedded_sharegpt_records():
    """First turns of English conversations, read up to the wheel's truncated last one, in
    file order; where = file and conversation number."""
    from sstoken.embedded import _english, sharegpt_records

    recs = list(sharegpt_records())
    assert 9000 < len(recs) < 17671                 # English first-turn pairs of 17,671 conversations
    where, r = recs[0]
    assert where.endswith("conversation 1") and r["id"].startswith("sharegpt-")
    assert r["prompt"].startswith("Summarize the main ideas of Jeff Walker")
    assert all(x["prompt"] and x["completion"] for _, x in recs[:500])
    assert len({x["id"] for _, x in recs}) == len(recs)
    assert _english("Hello, world: 42!") and not _english("你好，世界") and not _english("123")


# --------------------------------------------------------------------------- weights in the data

def token_weights(tok, msgs, template="tulu"):
    ids, labels, w = tokenize_messages(msgs, tok, template)
    return ids, labels, w


def test_message_weight_trains_only_the_last_turn(tok):
    msgs = [{"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "It is 5.", "weight": 0},
            {"role": "user", "content": "And 4+5?"},
            {"role": "assistant", "content": "Then 9."}]
    ids, labels, w = token_weights(tok, msgs)
    assert trained_text(tok, ids, labels) == "Then 9.<|im_end|>\n"          # the first turn: context
    assert {x for x, lab in zip(w, labels) if lab != IGNORE_INDEX} == {1.0}
    assert all(x == 0 for x, lab in zip(w, labels) if lab == IGNORE_INDEX)


def test_spans_weigh_part_of_a_turn_by_the_first_character_rule(tok):
    content = "Let me think. 2+3 is 5. Answer: 5"
    span_end = content.index(" Answer")                   # the reasoning: [0, span_end)
    msgs = [{"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": content, "spans": [{"start": 0, "end": span_end, "weight": 0.25}]},
            {"role": "user", "content": "ok", "weight": 0.5}]
    ids, labels, w = token_weights(tok, msgs)
    enc = tok(render_tulu(msgs, tok.eos_token)[0], return_offsets_mapping=True)
    text = render_tulu(msgs, tok.eos_token)[0]
    start = text.index(content)
    for (s, e), x, lab in zip(enc["offset_mapping"], w, labels):
        if e <= s:
            continue
        if start <= s < start + span_end:
            assert x == 0.25                              # a token whose first character is in the span
        elif start + span_end <= s < text.index("<|user|>\nok"):
            assert x == 1.0                               # the rest of the turn, eos and newline
        elif text[s:e].strip() == "ok":
            assert x == 0.5 and lab != IGNORE_INDEX        # a weighted user message is trained
    assert 0.25 in w and 1.0 in w and 0.5 in w


def test_spans_follow_the_template_s_stripping_and_the_chat_template(tok):
    """Offsets are in the content as given (the tulu template strips it; the chat template
    does not). A token takes the weight of its first character: " sea" starts with the space
    at offset 5, so the span must start there to weigh it."""
    for start, want in ((5, "sea"), (6, "")):
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "  the sea is wide",
                 "spans": [{"start": start, "end": 9, "weight": 2.0}]}]
        for template in ("tulu", "chat"):
            ids, labels, w = token_weights(tok, msgs, template)
            heavy = tok.decode([i for i, x in zip(ids, w) if x == 2.0])
            assert heavy.strip() == want, (template, start, heavy)


@pytest.mark.parametrize("msg, error", [
    ({"weight": -1}, "messages[1].weight must be a number >= 0, got -1"),
    ({"weight": "high"}, "must be a number >= 0"),
    ({"weight": True}, "must be a number >= 0"),
    ({"spans": {"start": 0}}, "spans must be a list"),
    ({"spans": [{"start": 0, "end": 2}]}, "must be an object with exactly start, end and weight"),
    ({"spans": [{"start": 0, "end": 99, "weight": 1}]}, "[0, 99) is out of range for a content of 8"),
    ({"spans": [{"start": 3, "end": 3, "weight": 1}]}, "out of range"),
    ({"spans": [{"start": 0.5, "end": 3, "weight": 1}]}, "must be integers"),
    ({"spans": [{"start": 0, "end": 4, "weight": -2}]}, "spans[0].weight must be a number >= 0"),
    ({"spans": [{"start": 0, "end": 4, "weight": 1}, {"start": 3, "end": 6, "weight": 1}]}, "[0, 4) and [3, 6) overlap"),
])
def test_bad_weights_and_spans_name_file_and_line(tmp_path, tok, msg, error):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer 5", **msg}]}
    p = tmp_path / "w.jsonl"
    p.write_text('{"prompt": "ok", "completion": "fine"}\n' + json.dumps(rec) + "\n")
    with pytest.raises(DataError) as e:
        load_examples(str(p), tok)
    assert f"{p}:2: " in str(e.value) and error in str(e.value)
    ex, st = load_examples(str(p), tok, skip_invalid=True)
    assert len(ex) == 1 and st.invalid == 1


def test_weights_travel_with_the_batch(tmp_path, tok):
    recs = [{"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a b c", "spans": [{"start": 0, "end": 1, "weight": 3.0}]}]},
            {"prompt": "plain", "completion": "record"}]
    p = write_jsonl(tmp_path / "w.jsonl", recs)
    ex, _ = load_examples(p, tok)
    assert all("data_weight" in e.extra for e in ex)       # filled for the plain record: 1 on R
    assert ex[1].extra["data_weight"] == [0.0 if x == IGNORE_INDEX else 1.0 for x in ex[1].labels]
    batch = Collator(tok.pad_token_id)([ExampleDataset(ex)[k] for k in range(2)])
    assert batch["data_weight"].shape == batch["input_ids"].shape and float(batch["data_weight"].max()) == 3.0
