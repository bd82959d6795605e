"""Document processing for sstoken's offline lm-eval tasks (the ``!function utils.X`` helpers).

:func:`sstoken.evaluation.tasks.write_offline_tasks` copies this file next to the task YAMLs as
``utils.py`` (lm-eval imports ``utils.py`` from the YAML's folder) and writes this run's data
beside it as ``utils.json`` (same name, ``.json``): ``{"mmlu_shuffle_seed": int,
"mmlu_dev_files": [absolute .arrow paths]}``, read at first use by :func:`settings`. Each helper
mirrors the stock task's helper named in its comment.

Imports lm-eval (the few-shot sampler's base class), so it is imported only by lm-eval itself
or where lm-eval is installed.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from lm_eval.api.samplers import ContextSampler


@functools.cache
def settings() -> dict:
    """This copy's ``utils.json`` (see the module docstring)."""
    path = Path(__file__).with_suffix(".json")
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; sstoken.evaluation.write_offline_tasks writes it "
                                f"beside its copy of this module")
    return json.loads(path.read_text(encoding="utf-8"))


def _clean(text):                       # lm_eval/tasks/hellaswag/utils.py: preprocess
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):            # lm_eval/tasks/hellaswag/utils.py: process_docs
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean(doc["activity_label"] + ": " + ctx),
                "choices": [_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return dataset.map(one)


def mmlu_docs(dataset):                 # one task over all subjects: mix them for --limit
    return dataset.shuffle(seed=settings()["mmlu_shuffle_seed"])


class MMLUSubjectSampler(ContextSampler):
    """Few-shot examples for the one-task MMLU: the first n dev questions of the evaluated
    question's own subject, as lm-eval's per-subject mmlu_* tasks do (first_n on dev).
    lm-eval hands a sampler the evaluated doc only when the few-shot split is the test split,
    which is why the task file says ``fewshot_split: test``; that pool itself is not used."""

    _by_subject = None

    def sample(self, n, eval_doc=None, df=None, **kwargs):
        if MMLUSubjectSampler._by_subject is None:
            import datasets

            dev = datasets.load_dataset("arrow", data_files={"dev": settings()["mmlu_dev_files"]},
                                        split="dev")
            by_subject = {}
            for doc in dev:
                by_subject.setdefault(doc["subject"], []).append(doc)
            MMLUSubjectSampler._by_subject = by_subject
        pool = MMLUSubjectSampler._by_subject[eval_doc["subject"]]
        if n > len(pool):
            raise ValueError(f"mmlu: {n} shots asked, {eval_doc['subject']} has {len(pool)} dev questions")
        return pool[:n]


def winogrande_text(doc):               # lm_eval/tasks/winogrande/preprocess_winogrande.py
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choice(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]
