"""sstoken.evaluation: the lm-eval runner (offline preset end to end on the tiny model, base +
LoRA adapter), the held-out loss, lm-eval result parsing, the CLI hooks, and that the package
imports without lm-eval, torch, matplotlib or scipy."""
import inspect
import json
import math
import os
import subprocess
import sys
import time

import pytest

from sstoken.evaluation import OFFLINE_TASKS, evaluate, metrics_of


def test_package_imports_without_optional_dependencies(tmp_path):
    """``import sstoken.evaluation`` (and sstoken.stats) with lm_eval, torch, matplotlib, scipy,
    peft, transformers and datasets blocked; the tables and the task files work without them."""
    code = f"""
import sys
for m in ("lm_eval", "torch", "matplotlib", "scipy", "peft", "transformers", "datasets"):
    sys.modules[m] = None                       # `import m` now raises ImportError
import sstoken.evaluation as ev
import sstoken.stats
assert ev.write_offline_tasks({str(tmp_path / "t")!r}, ["arc_easy"]) == {{"arc_easy": "sstoken_arc_easy"}}
t = ev.results_table([{{"results": {{"arc_easy": {{"acc": 0.5, "acc_stderr": 0.01}}}}}}], ["r"])
assert "| r | **50.0 ± 1.0** | **50.0** |" in t, t
print(sorted(ev.__all__))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import sstoken.evaluation as ev

    assert r.stdout.strip() == str(sorted(ev.__all__))
    assert all(hasattr(ev, n) for n in ev.__all__)
    assert (tmp_path / "t" / "utils.py").exists() and (tmp_path / "t" / "utils.json").exists()


def test_public_functions_take_keywords():
    assert all(p.kind is p.KEYWORD_ONLY for p in inspect.signature(evaluate).parameters.values())
    with pytest.raises(TypeError):
        evaluate("some-model")
    from sstoken.evaluation import compare, heldout_loss

    assert [p.kind.name for p in inspect.signature(compare).parameters.values()] == \
        ["POSITIONAL_OR_KEYWORD", "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY", "KEYWORD_ONLY"]
    held = inspect.signature(heldout_loss).parameters
    assert list(held)[:2] == ["model", "tokenizer"]
    assert all(p.kind is p.KEYWORD_ONLY for p in list(held.values())[2:])


@pytest.fixture(scope="module")
def tiny_eval(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    t0 = time.time()
    report = evaluate(model=tiny_dir, adapter=None, preset="offline", tasks=None, limit=2, batch_size=4,
                      device="cpu", output_dir=str(out))
    return report, out, time.time() - t0


def test_offline_preset_end_to_end(tiny_eval, tiny_dir):
    report, out, seconds = tiny_eval
    assert set(report["results"]) == set(OFFLINE_TASKS)
    for task, metrics in report["results"].items():
        main = "exact_match" if task == "triviaqa" else "acc"
        assert 0.0 <= metrics[main] <= 1.0, task
        se = metrics[f"{main}_stderr"]
        assert se is None or math.isfinite(se), task
        assert report["n_samples"][task]["effective"] == 2
    assert "acc_norm" in report["results"]["arc_challenge"]
    saved = json.loads((out / "eval.json").read_text())
    assert saved == report
    assert saved["limit"] == 2 and saved["model"] == tiny_dir and saved["adapter"] is None
    assert saved["preset"] == "offline" and saved["versions"]["lm_eval"] and saved["date"]
    assert saved["num_fewshot"] == {t: None for t in OFFLINE_TASKS} and saved["chat_template"] is False
    md = (out / "eval.md").read_text()
    assert md.startswith("| run | arc_challenge (acc) |") and "average" in md
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_adapter_is_merged_for_evaluation(tiny_dir, tmp_path, monkeypatch):
    import peft
    import torch

    from sstoken.modeling import load_model, load_model_with_adapter

    base = load_model(tiny_dir, "float32")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    ids = torch.randint(5, 300, (1, 9))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        got = load_model_with_adapter(tiny_dir, str(tmp_path / "ad"), "float32")(input_ids=ids).logits
        plain = load_model(tiny_dir, "float32")(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5 and (got - plain).abs().max() > 1e-4
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    report = evaluate(model=tiny_dir, adapter=str(tmp_path / "ad"), preset="offline", tasks=["arc_easy"],
                      limit=2, batch_size=2, num_fewshot=1, output_dir=str(tmp_path / "ev"))
    assert "HF_HUB_OFFLINE" not in os.environ                       # set for the run only
    assert report["adapter"] == str(tmp_path / "ad") and set(report["results"]) == {"arc_easy"}
    assert report["num_fewshot"] == {"arc_easy": 1}
    base_report = evaluate(model=tiny_dir, adapter=None, preset="offline", tasks=["arc_easy"], limit=2,
                           batch_size=2, num_fewshot=1, output_dir=str(tmp_path / "ev0"), chat_template=True)
    assert set(base_report["results"]) == {"arc_easy"} and base_report["chat_template"] is True
    with pytest.raises(ValueError, match="preset"):
        evaluate(model=tiny_dir, preset="nope", output_dir=str(tmp_path / "x"))


from fake_scores import fake_eval_run as _fake_run  # noqa: E402


def test_metrics_of_lm_eval_results():
    r = metrics_of({"alias": "x", "acc,none": 0.5, "acc_stderr,none": "N/A",
                    "exact_match,remove_whitespace": 0.25, "exact_match_stderr,remove_whitespace": 0.1,
                    "f1,none": float("nan"), "f1_stderr,none": 0.2})
    assert r == {"acc": 0.5, "acc_stderr": None, "exact_match": 0.25, "exact_match_stderr": 0.1,
                 "f1": None, "f1_stderr": 0.2}
    two = metrics_of({"exact_match,strict": 0.1, "exact_match,flexible": 0.2})
    assert set(two) == {"exact_match/strict", "exact_match/strict_stderr",
                        "exact_match/flexible", "exact_match/flexible_stderr"}


def test_heldout_loss_matches_a_per_example_forward(tiny_dir, records, tmp_path):
    """heldout_loss (batched, padded, chunked loss) against one unpadded full-logit forward per
    example written here: the mean NLL over each response, then over documents / tokens."""
    import torch
    import torch.nn.functional as F

    from sstoken.data import load_examples
    from sstoken.evaluation import heldout_loss
    from sstoken.modeling import load_model, load_tokenizer

    data = tmp_path / "h.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(9, seed=3, multi_turn=True)))
    model, tok = load_model(tiny_dir, "float32").eval(), load_tokenizer(tiny_dir)
    got, prov = heldout_loss(model, tok, data=str(data), skip=2, samples=6, max_seq_length=40, batch_size=4)
    examples, _ = load_examples(str(data), tok, template="tulu", max_seq_length=40, limit=6, skip=2)
    assert examples[0].id == "ex2" and len(examples) == 6      # skip 2; a too-long one is dropped
    per_doc, nll = [], []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].double()           # (L-1, V)
            losses = F.cross_entropy(logits, ids[0, 1:], reduction="none")   # predicts token t+1
            keep = torch.tensor(e.labels[1:]) != -100
            per_doc.append(losses[keep].mean().item())
            nll += losses[keep].tolist()
    mean = sum(per_doc) / len(per_doc)
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_doc) / (len(per_doc) - 1))
    assert got["loss"] == pytest.approx(mean, abs=1e-5)
    assert got["loss_stderr"] == pytest.approx(sd / math.sqrt(len(per_doc)), abs=1e-5)
    assert got["token_loss"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert got["loss"] != pytest.approx(got["token_loss"], abs=1e-4)    # the two averages differ here
    assert prov["documents"] == 6 and prov["response_tokens"] == len(nll) and prov["skip"] == 2
    assert prov["document_losses"] == pytest.approx(per_doc, abs=1e-5)
    with pytest.raises(ValueError, match="no examples"):
        heldout_loss(model, tok, data=str(data), skip=50)
    # through evaluate(): no lm-eval task, the held-out loss only
    rep = evaluate(model=tiny_dir, adapter=None, preset="offline", tasks=[], output_dir=str(tmp_path / "ev"),
                   heldout={"data": str(data), "skip": 2, "samples": 6, "max_seq_length": 40})
    assert set(rep["results"]) == {"heldout"} and rep["heldout"]["documents"] == 6
    assert rep["results"]["heldout"]["loss"] == pytest.approx(mean, abs=1e-5)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(model=tiny_dir, adapter=None, preset="offline", tasks=[], output_dir=str(tmp_path / "ev2"))


def test_tag_without_aggregate_is_averaged():
    from sstoken.evaluation.harness import mean_of_subtasks

    r = mean_of_subtasks({"tydiqa_goldp_en": {"f1,none": 0.2, "f1_stderr,none": 0.3, "alias": "en"},
                           "tydiqa_goldp_fi": {"f1,none": 0.4, "f1_stderr,none": 0.4},
                           "other": {"f1,none": 1.0}}, "tydiqa_goldp")
    assert r["f1,none"] == pytest.approx(0.3) and r["f1_stderr,none"] == pytest.approx(0.25)


def test_cli_options(tmp_path, monkeypatch):
    from sstoken.args import parse
    from sstoken.cli import main
    from sstoken.errors import UsageError

    adapter = tmp_path / "ad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    m, ad, tpl, sc, ev = parse("eval", ["--model", "m", "--adapter", str(adapter), "--preset", "paper",
                                        "--tasks", "mmlu,arc_easy", "--limit", "50", "--batch-size", "2",
                                        "--device", "cpu", "--num-fewshot", "5", "--output-dir", "o"])
    assert (m.model, ad.adapter, ev.preset, ev.task_list(), ev.limit_value(), sc.batch_size,
            ev.num_fewshot, ev.output_dir) == ("m", str(adapter), "paper", ["mmlu", "arc_easy"], 50, 2, 5, "o")
    assert ev.apply_chat_template is False and m.dtype == "auto"
    assert parse("eval", ["--apply-chat-template"])[-1].apply_chat_template is True
    _, _, tpl, _, h = parse("eval", ["--heldout", "d.jsonl", "--heldout-skip", "5", "--heldout-samples", "7",
                                     "--template", "chat", "--max-seq-length", "64"])
    assert (h.heldout, h.heldout_skip, h.heldout_samples, tpl.template, tpl.max_seq_length) == \
        ("d.jsonl", 5, 7, "chat", 64) and parse("eval", [])[-1].heldout is None
    seen = {}

    def fake_evaluate(**kwargs):
        seen["kwargs"] = kwargs
        return {"results": {}, "seconds": 0}

    monkeypatch.setattr("sstoken.evaluation.evaluate", fake_evaluate)
    assert main(["eval", "--tasks", "none", "--heldout", "d.jsonl", "--output-dir", str(tmp_path / "o")]) == 0
    assert seen["kwargs"]["tasks"] == []
    assert set(seen["kwargs"]) == set(inspect.signature(evaluate).parameters)      # every argument passed
    assert seen["kwargs"]["heldout"] == {"data": "d.jsonl", "skip": 0, "samples": None, "template": "tulu",
                                         "max_seq_length": 2048}
    with pytest.raises(UsageError, match="preset must be one of"):
        parse("eval", ["--preset", "hub"])
    with pytest.raises(UsageError, match="not a LoRA adapter"):
        parse("eval", ["--adapter", str(tmp_path)])
    runs = [_fake_run(tmp_path / "a", 0.5, 0.1), _fake_run(tmp_path / "b", 0.6, None)]
    (c,) = parse("compare", [*runs, "--labels", "base,tuned", "--output-dir", str(tmp_path / "c")])
    assert c.baseline == "full" and c.inputs == runs
    assert main(["compare", *runs, "--labels", "base,tuned", "--output-dir", str(tmp_path / "c")]) == 0
    assert "| tuned | **60.0** |" in (tmp_path / "c" / "compare.md").read_text()
    assert (tmp_path / "c" / "compare.png").exists()


@pytest.mark.real_model
def test_real_model_offline_preset(tmp_path):
    """SmolLM2-135M-Instruct (shipped GGUF) on every offline task, 2 documents each."""
    t0 = time.time()
    report = evaluate(model="embedded:smollm2-135m-instruct", adapter=None, preset="offline", tasks=None, limit=2,
                      batch_size=4, device="cpu", output_dir=str(tmp_path / "ev"))
    assert set(report["results"]) == set(OFFLINE_TASKS)
    for task, metrics in report["results"].items():
        main = "exact_match" if task == "triviaqa" else "acc"
        assert 0.0 <= metrics[main] <= 1.0
        assert metrics[f"{main}_stderr"] is None or math.isfinite(metrics[f"{main}_stderr"])
    assert report["resolved_model"] != report["model"]
    print(f"real model, offline preset, limit 2: {time.time() - t0:.0f}s")
