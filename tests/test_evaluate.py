"""sstoken.evaluate: offline lm-eval task files (checked against lm-eval's stock tasks), the
offline preset end to end on the tiny model, base + LoRA adapter, compare, the CLI hooks."""
import argparse
import json
import math
import os
import time
from pathlib import Path

import pytest
import yaml

from sstoken.evaluate import (OFFLINE_TASKS, PAPER_TASKS, add_compare_parser, add_eval_parser, compare,
                              evaluate, metrics_of, results_table, write_offline_tasks)

import lm_eval  # noqa: E402  (installed by scripts/setup.sh; a missing one must fail, not skip)
STOCK = Path(lm_eval.__file__).parent / "tasks"


def _stock(rel: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(STOCK / rel, resolve_func=True)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return d, write_offline_tasks(d)


@pytest.fixture(scope="module")
def built_tasks(task_dir):
    """Every offline task built by lm-eval from the written files (reads the shipped arrows)."""
    from lm_eval.tasks import TaskManager

    d, names = task_dir
    tm = TaskManager(include_path=str(d), include_defaults=False)
    tasks = tm.load(list(names.values()))["tasks"]
    return {short: tasks[name] for short, name in names.items()}


def test_offline_task_files(task_dir, tmp_path):
    d, names = task_dir
    assert names == {t: f"sstoken_{t}" for t in OFFLINE_TASKS}
    for name in names.values():
        text = (d / f"{name}.yaml").read_text()
        assert text.count("dataset_path: arrow") == 1
        cfg = yaml.load(text, Loader=yaml.BaseLoader)        # ignores the !function tags' meaning
        for files in cfg["dataset_kwargs"]["data_files"].values():
            assert files and all(os.path.isabs(f) and os.path.exists(f) for f in files)
    assert "process_docs: !function 'utils.hellaswag_docs'" in (d / "sstoken_hellaswag.yaml").read_text()
    mmlu = yaml.load((d / "sstoken_mmlu.yaml").read_text(), Loader=yaml.BaseLoader)
    assert len(mmlu["dataset_kwargs"]["data_files"]["test"]) == 57
    assert not list(d.glob(".*.tmp"))                                  # atomic writes, cleaned up
    with pytest.raises(ValueError, match="unknown offline task"):
        write_offline_tasks(tmp_path / "x", ["arc_easy", "nope"])
    assert write_offline_tasks(tmp_path / "y", ["winogrande"]) == {"winogrande": "sstoken_winogrande"}
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == ["sstoken_winogrande.yaml", "utils.py"]


def test_offline_tasks_match_stock_prompts_and_metrics(task_dir, built_tasks):
    """Same prompt templates, metrics and generation settings as lm-eval's stock tasks."""
    d, _ = task_dir
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = {t: load_yaml(d / f"sstoken_{t}.yaml", resolve_func=False) for t in OFFLINE_TASKS}
    stock = {"arc_easy": _stock("arc/arc_easy.yaml"), "arc_challenge": _stock("arc/arc_challenge.yaml"),
             "triviaqa": _stock("triviaqa/default.yaml"), "mmlu": _stock("mmlu/default/mmlu_anatomy.yaml"),
             "hellaswag": _stock("hellaswag/hellaswag.yaml"), "winogrande": _stock("winogrande/default.yaml")}
    for t in ("arc_easy", "arc_challenge", "triviaqa", "mmlu"):
        for key in ("output_type", "doc_to_text", "doc_to_choice", "metric_list", "filter_list"):
            assert ours[t].get(key) == stock[t].get(key), (t, key)
    assert ours["triviaqa"]["doc_to_target"] == stock["triviaqa"]["doc_to_target"]
    gen = dict(ours["triviaqa"]["generation_kwargs"])
    assert gen.pop("max_gen_toks") == 32 and gen == stock["triviaqa"]["generation_kwargs"]
    for t in ("hellaswag", "winogrande"):
        assert ours[t]["metric_list"] == stock[t]["metric_list"], t
    # stock MMLU: description per subject; few-shot = the first n dev questions of that subject
    mmlu = built_tasks["mmlu"]
    doc = next(x for x in mmlu.eval_docs.select(range(100)) if x["subject"] == "anatomy")
    assert mmlu.fewshot_context(doc, 0).startswith(stock["mmlu"]["description"])
    from datasets import load_from_disk

    from sstoken.evaluate import _olmo_root

    dev = load_from_disk(str(_olmo_root() / "hails/mmlu_no_train/anatomy/dev"))
    ctx = mmlu.fewshot_context(doc, 2)
    assert dev[0]["question"].strip() in ctx and dev[1]["question"].strip() in ctx
    assert dev[2]["question"].strip() not in ctx
    assert ctx.count("\nAnswer:") == 3 and ctx.endswith(mmlu.doc_to_text(doc))


def test_offline_docs_match_stock_helpers(built_tasks):
    """HellaSwag and Winogrande: our helpers give the stock helpers' text, choices and target."""
    import importlib.util

    def stock_module(rel):
        spec = importlib.util.spec_from_file_location(rel.replace("/", "_"), STOCK / rel)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    hs, wg = stock_module("hellaswag/utils.py"), stock_module("winogrande/preprocess_winogrande.py")
    task = built_tasks["hellaswag"]
    raw = task.dataset["validation"].select(range(20))
    want = hs.process_docs(raw)
    got = task.eval_docs.select(range(20))
    for w, g in zip(want, got):
        assert (g["query"], g["choices"], g["gold"]) == (w["query"], w["choices"], w["gold"])
        assert task.doc_to_text(g) == w["query"] and task.doc_to_target(g) == int(w["label"])
    task = built_tasks["winogrande"]
    for doc in task.eval_docs.select(range(20)):
        assert task.doc_to_text(doc) == wg.doc_to_text(doc)
        assert task.doc_to_target(doc) == wg.doc_to_target(doc)
        assert task.doc_to_choice(doc) == wg.doc_to_choice(doc)
    arc = built_tasks["arc_challenge"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_choice(doc)[arc.doc_to_target(doc)] == \
        doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]
    assert len(built_tasks["mmlu"].eval_docs) == 14042 and len(arc.eval_docs) == 299


@pytest.fixture(scope="module")
def tiny_eval(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    t0 = time.time()
    report = evaluate(tiny_dir, None, "offline", None, limit=2, batch_size=4, device="cpu",
                      output_dir=str(out))
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
    report = evaluate(tiny_dir, str(tmp_path / "ad"), "offline", ["arc_easy"], limit=2, batch_size=2,
                      num_fewshot=1, output_dir=str(tmp_path / "ev"))
    assert "HF_HUB_OFFLINE" not in os.environ                       # set for the run only
    assert report["adapter"] == str(tmp_path / "ad") and set(report["results"]) == {"arc_easy"}
    assert report["num_fewshot"] == {"arc_easy": 1}
    base_report = evaluate(tiny_dir, None, "offline", ["arc_easy"], limit=2, batch_size=2,
                           num_fewshot=1, output_dir=str(tmp_path / "ev0"), chat_template=True)
    assert set(base_report["results"]) == {"arc_easy"} and base_report["chat_template"] is True
    with pytest.raises(ValueError, match="preset"):
        evaluate(tiny_dir, preset="nope", output_dir=str(tmp_path / "x"))


def _fake_run(d: Path, acc: float, se: float | None) -> str:
    d.mkdir()
    (d / "eval.json").write_text(json.dumps({"results": {
        "arc_easy": {"acc": acc, "acc_stderr": se, "acc_norm": 0.1, "acc_norm_stderr": 0.01},
        "triviaqa": {"exact_match": acc / 2, "exact_match_stderr": se}}}))
    return str(d)


def test_compare_table_marks_best_and_plots(tmp_path):
    runs = [_fake_run(tmp_path / "a", 0.50, 0.02), _fake_run(tmp_path / "b", 0.55, 0.02)]
    res = compare(runs, tmp_path / "cmp")
    table = res["markdown"]
    assert table.splitlines()[0] == "| run | arc_easy (acc) | triviaqa (exact_match) | average |"
    assert "| b | **55.0 ± 2.0** | **27.5 ± 2.0** | **41.3** |" in table
    assert "| a | 50.0 ± 2.0 | 25.0 ± 2.0 | 37.5 |" in table
    assert Path(res["table"]).read_text() == table
    png = Path(res["plot"])
    assert png == tmp_path / "cmp" / "compare.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000
    # eval.json paths and labels work too
    res = compare([str(Path(r) / "eval.json") for r in runs], tmp_path / "cmp2", labels=["x", "y"])
    assert "| y | **55.0 ± 2.0** |" in res["markdown"]
    with pytest.raises(ValueError, match="labels"):
        compare(runs, tmp_path / "cmp3", labels=["only-one"])
    with pytest.raises(FileNotFoundError, match="no eval.json"):
        compare([str(tmp_path)], tmp_path / "c2")


def test_results_table_handles_missing_values():
    t = results_table([{"results": {"arc_easy": {"acc": 0.5, "acc_stderr": None}}},
                       {"results": {"mmlu": {"acc": 0.3, "acc_stderr": 0.1}}}], ["x", "y"])
    assert "| x | **50.0** | - | - |" in t                    # no average without every task
    assert "| y | - | **30.0 ± 10.0** | - |" in t


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
    from sstoken.evaluate import heldout_loss
    from sstoken.modeling import load_model, load_tokenizer

    data = tmp_path / "h.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(9, seed=3, multi_turn=True)))
    model, tok = load_model(tiny_dir, "float32").eval(), load_tokenizer(tiny_dir)
    got, prov = heldout_loss(model, tok, str(data), skip=2, samples=6, max_seq_length=40, batch_size=4)
    examples, _ = load_examples(str(data), tok, "tulu", 40, limit=6, skip=2)
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
        heldout_loss(model, tok, str(data), skip=50)
    # through evaluate(): no lm-eval task, the held-out loss only
    rep = evaluate(tiny_dir, None, "offline", [], output_dir=str(tmp_path / "ev"),
                   heldout={"data": str(data), "skip": 2, "samples": 6, "max_seq_length": 40})
    assert set(rep["results"]) == {"heldout"} and rep["heldout"]["documents"] == 6
    assert rep["results"]["heldout"]["loss"] == pytest.approx(mean, abs=1e-5)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(tiny_dir, None, "offline", [], output_dir=str(tmp_path / "ev2"))


def _seed_run(root: Path, name: str, acc: float, loss: float) -> str:
    d = root / name
    d.mkdir()
    (d / "eval.json").write_text(json.dumps({"results": {
        "arc_easy": {"acc": acc, "acc_stderr": 0.01},
        "heldout": {"loss": loss, "loss_stderr": 0.002, "token_loss": loss, "token_loss_stderr": None}}}))
    return str(d)


def test_compare_over_seeds_pairs_by_seed(tmp_path):
    import statistics

    from scipy.stats import t as student_t

    from sstoken.evaluate import seed_groups

    full = [(0.50, 1.00), (0.52, 1.10), (0.54, 1.20)]
    sst = [(0.55, 1.01), (0.58, 1.12), (0.57, 1.19)]
    runs = [_seed_run(tmp_path, "base", 0.40, 1.50)]
    runs += [_seed_run(tmp_path, f"full-seed{k}", *v) for k, v in enumerate(full)]
    runs += [_seed_run(tmp_path, f"sstoken-gamma0.5-seed{k}", *v) for k, v in enumerate(sst)]
    assert seed_groups([Path(r).name for r in runs]) == {
        "base": {-1: 0}, "full": {0: 1, 1: 2, 2: 3}, "sstoken-gamma0.5": {0: 4, 1: 5, 2: 6}}
    md = compare(runs, tmp_path / "cmp")["markdown"]
    # the loss column is in nats, lower is better, and not part of the average
    assert "| run (n) | arc_easy (acc) | average | heldout (loss, lower is better) |" in md
    se_full = statistics.stdev([52.0 - 2, 52.0, 52.0 + 2]) / math.sqrt(3)
    assert f"| full (3) | 52.0 ± {se_full:.1f} | 52.0 ± {se_full:.1f} | **1.1000 ± 0.0577** |" in md
    assert "| base (1) | 40.0 | 40.0 | 1.5000 |" in md                   # one run: no stderr over seeds
    assert "| sstoken-gamma0.5 (3) | **56.7 ± 0.9** | **56.7 ± 0.9** | 1.1067 ± 0.0524 |" in md
    diffs = [5.0, 6.0, 3.0]                                      # sstoken - full per seed, points
    m, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(3)
    h = student_t.ppf(0.975, 2) * se
    assert f"**{m:+.1f} ± {se:.1f} [{m - h:+.1f}, {m + h:+.1f}]**" in md     # excludes 0: bold
    dl = [0.01, 0.02, -0.01]
    ml, sel = statistics.mean(dl), statistics.stdev(dl) / math.sqrt(3)
    hl = student_t.ppf(0.975, 2) * sel
    assert f"| {ml:+.4f} ± {sel:.4f} [{ml - hl:+.4f}, {ml + hl:+.4f}] |" in md  # includes 0: plain
    assert "| base |" not in md.split("Difference to full")[1].split("Every run")[0]  # nothing to pair
    assert "Every run:" in md and "| full-seed1 | 52.0 ± 1.0 |" in md
    assert Path(tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # no baseline group: means only
    md2 = compare(runs, tmp_path / "cmp2", baseline="nope")["markdown"]
    assert "Difference to" not in md2 and "| full (3) |" in md2
    with pytest.raises(ValueError, match="two runs named"):
        seed_groups(["a-seed0", "a-seed0"])


def test_tag_without_aggregate_is_averaged():
    from sstoken.evaluate import _mean_of_subtasks

    r = _mean_of_subtasks({"tydiqa_goldp_en": {"f1,none": 0.2, "f1_stderr,none": 0.3, "alias": "en"},
                           "tydiqa_goldp_fi": {"f1,none": 0.4, "f1_stderr,none": 0.4},
                           "other": {"f1,none": 1.0}}, "tydiqa_goldp")
    assert r["f1,none"] == pytest.approx(0.3) and r["f1_stderr,none"] == pytest.approx(0.25)


def test_paper_preset_names_are_stock_lm_eval_tasks():
    """Every paper task is a stock lm-eval task, group or tag (checked on the installed files)."""
    import re

    names = set()
    for f in STOCK.rglob("*yaml"):
        text = f.read_text(errors="ignore")
        names.update(re.findall(r"^(?:task|group|tag):[ \t]*['\"]?([\w\-]+)", text, re.M))
        for block in re.findall(r"^tag:[ \t]*\n((?:[ \t]+- .*\n?)+)", text, re.M):
            names.update(x.strip()[2:].strip() for x in block.splitlines())
    assert len(PAPER_TASKS) == 10
    for short, (metric, name, shots) in PAPER_TASKS.items():
        assert name in names, (short, name)
    assert PAPER_TASKS["tydiqa"][1:] == ("tydiqa_goldp", 1)
    with pytest.raises(ValueError, match="unknown paper task"):
        from sstoken.evaluate import _task_names

        _task_names("paper", ["mmlu", "gsm8k"], Path("unused"))


def test_cli_parsers(tmp_path, monkeypatch):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    add_eval_parser(sub)
    add_compare_parser(sub)
    a = p.parse_args(["eval", "--model", "m", "--adapter", "ad", "--preset", "paper", "--tasks", "mmlu,arc_easy",
                      "--limit", "50", "--batch-size", "2", "--device", "cpu", "--num-fewshot", "5",
                      "--output-dir", "o"])
    assert (a.model, a.adapter, a.preset, a.tasks, a.limit, a.batch_size, a.num_fewshot, a.output_dir) == \
        ("m", "ad", "paper", "mmlu,arc_easy", 50.0, 2, 5, "o") and callable(a.func)
    assert a.apply_chat_template is False and a.dtype == "auto"
    assert p.parse_args(["eval", "--apply-chat-template"]).apply_chat_template is True
    h = p.parse_args(["eval", "--heldout", "d.jsonl", "--heldout-skip", "5", "--heldout-samples", "7",
                      "--template", "chat", "--max-seq-length", "64"])
    assert (h.heldout, h.heldout_skip, h.heldout_samples, h.template, h.max_seq_length) == \
        ("d.jsonl", 5, 7, "chat", 64) and p.parse_args(["eval"]).heldout is None
    seen = {}

    def fake_evaluate(*args):
        seen["args"] = args
        return {"results": {}, "seconds": 0}

    monkeypatch.setattr("sstoken.evaluate.evaluate", fake_evaluate)
    h = p.parse_args(["eval", "--tasks", "none", "--heldout", "d.jsonl", "--output-dir", str(tmp_path / "o")])
    assert h.func(h) == 0 and seen["args"][3] == []
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--preset", "hub"])
    runs = [_fake_run(tmp_path / "a", 0.5, 0.1), _fake_run(tmp_path / "b", 0.6, None)]
    a = p.parse_args(["compare", *runs, "--labels", "base,tuned", "--output-dir", str(tmp_path / "c")])
    assert a.baseline == "full" and a.func(a) == 0
    assert "| tuned | **60.0** |" in (tmp_path / "c" / "compare.md").read_text()
    assert (tmp_path / "c" / "compare.png").exists()


@pytest.mark.real_model
def test_real_model_offline_preset(tmp_path):
    """SmolLM2-135M-Instruct (shipped GGUF) on every offline task, 2 documents each."""
    t0 = time.time()
    report = evaluate("embedded:smollm2-135m-instruct", None, "offline", None, limit=2, batch_size=4,
                      device="cpu", output_dir=str(tmp_path / "ev"))
    assert set(report["results"]) == set(OFFLINE_TASKS)
    for task, metrics in report["results"].items():
        main = "exact_match" if task == "triviaqa" else "acc"
        assert 0.0 <= metrics[main] <= 1.0
        assert metrics[f"{main}_stderr"] is None or math.isfinite(metrics[f"{main}_stderr"])
    assert report["resolved_model"] != report["model"]
    print(f"real model, offline preset, limit 2: {time.time() - t0:.0f}s")


def test_mean_se_is_the_stderr_of_the_mean():
    import statistics

    from sstoken.evaluate import mean_se

    xs = [1.0, 1.5, 4.0, 2.5]
    m, se = mean_se(xs)
    assert m == pytest.approx(statistics.mean(xs))
    assert se == pytest.approx(statistics.stdev(xs) / 2.0)
    assert mean_se([3.0]) == (3.0, None)
