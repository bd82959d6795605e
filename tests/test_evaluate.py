"""sstoken eval (lm-evaluation-harness, offline preset) and compare, on the tiny model."""
import json
import math

import pytest
import yaml

from sstoken.evaluate import OFFLINE_TASKS, compare, evaluate, results_table, write_offline_tasks


def test_offline_task_files(tmp_path):
    names = write_offline_tasks(tmp_path)
    assert set(names) == set(OFFLINE_TASKS)
    for short, name in names.items():
        text = (tmp_path / f"{name}.yaml").read_text()
        assert text.count("dataset_path: arrow") == 1 and "/hf_datasets/" in text
    assert "process_docs: !function 'utils.hellaswag_docs'" in (tmp_path / "sstoken_hellaswag.yaml").read_text()
    with pytest.raises(ValueError, match="unknown offline task"):
        write_offline_tasks(tmp_path / "x", ["arc_easy", "nope"])


@pytest.fixture(scope="module")
def tiny_eval(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate(tiny_dir, None, "offline", None, 2, 4, "cpu", None, str(out)), out


def test_offline_preset_end_to_end(tiny_eval):
    report, out = tiny_eval
    assert set(report["results"]) == set(OFFLINE_TASKS)
    for task, metrics in report["results"].items():
        main = "exact_match" if task == "triviaqa" else "acc"
        assert 0.0 <= metrics[main] <= 1.0, task
        se = metrics[f"{main}_stderr"]
        assert se is None or math.isfinite(se)
        assert report["n_samples"][task]["effective"] == 2
    saved = json.loads((out / "eval.json").read_text())
    assert saved["results"] == report["results"] and saved["limit"] == 2
    assert "| run |" in (out / "eval.md").read_text()


def test_adapter_is_merged_for_evaluation(tiny_dir, tmp_path):
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
    report = evaluate(tiny_dir, str(tmp_path / "ad"), "offline", ["arc_easy"], 2, 2, "cpu", None,
                      str(tmp_path / "ev"))
    assert report["adapter"] == str(tmp_path / "ad") and "arc_easy" in report["results"]


def test_compare_table_marks_best_and_plots(tmp_path):
    def fake(d, acc, se):
        d.mkdir()
        (d / "eval.json").write_text(json.dumps({"results": {
            "arc_easy": {"acc": acc, "acc_stderr": se}, "triviaqa": {"exact_match": acc / 2, "exact_match_stderr": se}}}))
        return str(d)

    runs = [fake(tmp_path / "a", 0.50, 0.02), fake(tmp_path / "b", 0.55, 0.02)]
    res = compare(runs, tmp_path / "cmp")
    table = res["markdown"]
    assert "| b | **55.0 ± 2.0** | **27.5 ± 2.0** | **41.3** |" in table
    assert "| a | 50.0 ± 2.0 | 25.0 ± 2.0 | 37.5 |" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="no eval.json"):
        compare([str(tmp_path)], tmp_path / "c2")


def test_sweep_expansion_and_resume(tmp_path, tiny_dir, records):
    from sstoken.sweep import expand, run_sweep

    spec = {"grid": [{"method": "full"}, {"method": "sstoken", "gamma": [0.0, 1.0]}], "seeds": [0, 1]}
    names = [r["name"] for r in expand(spec)]
    assert names == ["full-seed0", "full-seed1", "sstoken-gamma0.0-seed0", "sstoken-gamma0.0-seed1",
                     "sstoken-gamma1.0-seed0", "sstoken-gamma1.0-seed1"]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(6)))
    cfg = {"output_dir": str(tmp_path / "sw"),
           "base": {"model": tiny_dir, "data": str(data), "lora_r": 4, "max_steps": 1, "use_cpu": True,
                    "per_device_train_batch_size": 3, "cache_dir": str(tmp_path / "cache")},
           "grid": [{"method": "full"}, {"method": "sstoken", "gamma": [0.5]}], "seeds": [0],
           "eval": {"preset": "offline", "tasks": ["arc_easy"], "limit": 2, "batch_size": 2}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    res = run_sweep(str(tmp_path / "s.yaml"))
    assert len(res["runs"]) == 3                                 # base + 2 runs
    table = (tmp_path / "sw" / "compare" / "compare.md").read_text()
    assert "| base |" in table and "| sstoken-gamma0.5-seed0 |" in table
    s = json.loads((tmp_path / "sw" / "runs" / "sstoken-gamma0.5-seed0" / "sstoken_run.json").read_text())
    assert s["history_losses"] == "cache"                        # scored once, found by the run
    assert res["report"] and "sstoken-gamma0.5-seed0" in (tmp_path / "sw" / "report.html").read_text()
    mtime = (tmp_path / "sw" / "runs" / "full-seed0" / "sstoken_run.json").stat().st_mtime_ns
    run_sweep(str(tmp_path / "s.yaml"))                          # resumed: nothing is redone
    assert (tmp_path / "sw" / "runs" / "full-seed0" / "sstoken_run.json").stat().st_mtime_ns == mtime


def test_results_table_handles_missing_values():
    t = results_table([{"results": {"arc_easy": {"acc": 0.5, "acc_stderr": None}}},
                       {"results": {"mmlu": {"acc": 0.3, "acc_stderr": 0.1}}}], ["x", "y"])
    assert "| x | **50.0** | - | - |" in t


def test_tag_without_aggregate_is_averaged():
    from sstoken.evaluate import PAPER_TASKS, _mean_of_subtasks

    r = _mean_of_subtasks({"tydiqa_goldp_en": {"f1,none": 0.2, "f1_stderr,none": 0.3, "alias": "en"},
                           "tydiqa_goldp_fi": {"f1,none": 0.4, "f1_stderr,none": 0.4},
                           "other": {"f1,none": 1.0}}, "tydiqa_goldp")
    assert r["f1,none"] == pytest.approx(0.3) and r["f1_stderr,none"] == pytest.approx(0.25)
    assert PAPER_TASKS["tydiqa"][2] == 1 and len(PAPER_TASKS) == 10
