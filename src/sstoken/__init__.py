"""sstoken: token-level selection for supervised fine-tuning (ssToken, ICLR 2026, and baselines).

The Python API takes the same option names as the command line, with the same defaults
(:mod:`sstoken.args`)::

    import sstoken

    run = sstoken.train(model="embedded:smollm2-135m-instruct", data="embedded:gsm8k",
                        method="sstoken", rho=0.6, gamma=0.5, max_samples=48,
                        max_seq_length=256, output_dir="outputs/s")
    sstoken.score(model="embedded:smollm2-135m-instruct", data="embedded:gsm8k")
    report = sstoken.evaluate(model="embedded:smollm2-135m-instruct", adapter="outputs/s",
                              tasks=["arc_easy"], limit=50)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def train(**options: Any) -> dict:
    """Fine-tune with token selection; ``options`` are any option of ``sstoken train`` (model,
    LoRA, data, selection, and transformers' ``TrainingArguments``). Returns the run summary
    (also written to ``<output_dir>/sstoken_run.json``). Unknown or invalid options raise
    :class:`sstoken.errors.UsageError` listing every problem, before anything loads."""
    from .args import train_args_from
    from .runs import train as _train

    return _train(*train_args_from(options))


def score(**options: Any) -> Path:
    """Compute and cache a model's per-token losses over a dataset (``sstoken score``);
    ``options``: the model and data options (``model``, ``data``, ``template``,
    ``max_seq_length``, ``cache_dir``, ``batch_size`` ...). Returns the cache entry's folder."""
    from .args import COMMANDS, build, option_names
    from .errors import UsageError
    from .runs import score as _score

    types = COMMANDS["score"][1]
    unknown = sorted(set(options) - option_names(types))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}")
    return _score(*build(types, options))


def evaluate(**options: Any) -> dict:
    """lm-evaluation-harness (and the held-out loss); see :func:`sstoken.evaluation.evaluate`."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(**options)


__all__ = ["train", "score", "evaluate", "__version__"]
