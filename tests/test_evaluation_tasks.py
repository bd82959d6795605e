"""sstoken.evaluation.tasks and task_utils: the offline lm-eval task files, checked against
lm-eval's stock tasks; the paper preset's names; the helper module and its data sidecar."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from sstoken.evaluation import OFFLINE_TASKS, PAPER_TASKS, write_offline_tasks
from sstoken.evaluation.tasks import MMLU_SHUFFLE_SEED, olmo_root

import lm_eval  # noqa: E402  (installed by scripts/setup.sh; a missing one must fail, not skip)
STOCK = Path(lm_eval.__file__).parent / "tasks"


def _stock(rel: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(STOCK / rel, resolve_func=True)


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == \
        ["sstoken_winogrande.yaml", "utils.json", "utils.py"]


def test_task_utils_is_a_module_copied_with_its_data(task_dir):
    """task_utils imports as a package module; write_offline_tasks copies it verbatim as utils.py
    and writes the per-run data it reads (utils.json) beside the copy."""
    from sstoken.evaluation import task_utils

    d, _ = task_dir
    assert (d / "utils.py").read_bytes() == Path(task_utils.__file__).read_bytes()
    doc = {"sentence": "The cup fell because _ was slippery.", "option1": "it", "option2": "the table",
           "answer": "2"}
    assert task_utils.winogrande_text(doc) == 1
    assert task_utils.winogrande_target(doc) == "was slippery."
    assert task_utils.winogrande_choice(doc) == ["The cup fell because it", "The cup fell because the table"]
    assert task_utils._clean(" Cooking [title] How to [step] stir  it ") == "Cooking. How to stir it"
    with pytest.raises(FileNotFoundError, match="write_offline_tasks"):
        task_utils.settings()                                  # the package copy has no utils.json
    copy = _module(d / "utils.py", "sstoken_test_copied_utils")
    data = json.loads((d / "utils.json").read_text())
    assert copy.settings() == data and data["mmlu_shuffle_seed"] == MMLU_SHUFFLE_SEED
    dev = data["mmlu_dev_files"]
    assert len(dev) == 57 and all(os.path.isabs(f) and os.path.exists(f) for f in dev)


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

    dev = load_from_disk(str(olmo_root() / "hails/mmlu_no_train/anatomy/dev"))
    ctx = mmlu.fewshot_context(doc, 2)
    assert dev[0]["question"].strip() in ctx and dev[1]["question"].strip() in ctx
    assert dev[2]["question"].strip() not in ctx
    assert ctx.count("\nAnswer:") == 3 and ctx.endswith(mmlu.doc_to_text(doc))


def test_offline_docs_match_stock_helpers(built_tasks):
    """HellaSwag and Winogrande: our helpers give the stock helpers' text, choices and target."""
    hs = _module(STOCK / "hellaswag/utils.py", "hellaswag_utils.py")
    wg = _module(STOCK / "winogrande/preprocess_winogrande.py", "winogrande_preprocess_winogrande.py")
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
        from sstoken.evaluation.harness import task_names

        task_names("paper", ["mmlu", "gsm8k"], Path("unused"))
