"""``sstoken`` command line: train, score, train-ref, merge, demo, eval, compare, show.

``sstoken train`` takes every option of the four config dataclasses (see ``sstoken train
--help``), including all of transformers' ``TrainingArguments``, plus ``--config run.yaml``.
"""

from __future__ import annotations

import argparse
import sys

from .embedded import EMBEDDED_DATA, EMBEDDED_MODEL

SUBCOMMANDS = {
    "train": "fine-tune with token selection (LoRA or full); all Trainer options work",
    "score": "compute and cache a model's per-token losses over a dataset (history/reference)",
    "train-ref": "train a reference model on a high-quality subset (for rho1 / tokencleaning)",
    "merge": "merge a LoRA adapter into its base model and save a plain model",
    "demo": "fine-tune the embedded SmolLM2-135M on embedded GSM8K with ssToken, then merge",
    "eval": "evaluate a model or adapter with lm-evaluation-harness (offline preset ships)",
    "compare": "put several evaluations side by side (table + plot)",
    "show": "HTML page of which tokens were selected, with plots",
    "sweep": "run a grid of trainings from one YAML (resumable), evaluate and compare them",
}


def _train(argv: list[str]) -> int:
    from .config import parse_train_args
    from .pipeline import log, run_train

    model_args, data_args, sel_args, train_args = parse_train_args(argv)
    summary = run_train(model_args, data_args, sel_args, train_args)
    log(f"done in {summary['seconds']}s: {summary['steps']} steps, loss {summary['first_loss']} -> "
        f"{summary['last_loss']}; outputs in {summary['output_dir']}")
    return 0


def _train_ref(argv: list[str]) -> int:
    """Train the reference model (method full) on the high-quality subset, then merge it so
    it loads as a plain model (``--ref_model <output_dir>/merged``)."""
    from pathlib import Path

    from .config import parse_train_args
    from .pipeline import log, run_merge, run_train

    if "-h" in argv or "--help" in argv:
        print("usage: sstoken train-ref --data HIGH_QUALITY.jsonl [--model M] [--output_dir D] "
              "[any `sstoken train` option]\n\nTrains with method full on the given subset and "
              "writes a merged model to D/merged, to pass as --ref_model.")
        return 0
    model_args, data_args, sel_args, train_args = parse_train_args(argv + ["--method", "full"])
    summary = run_train(model_args, data_args, sel_args, train_args)
    out = Path(summary["output_dir"])
    if model_args.finetune == "lora":
        merged = run_merge(model_args.model, str(out), str(out / "merged"))
    else:
        merged = str(out)
    log(f"reference model ready: --ref_model {merged}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sstoken",
        description="Token selection for supervised fine-tuning: ssToken (ICLR 2026) and the "
                    "baselines full, random, rho1, tokencleaning. Runs offline on an embedded "
                    f"model ({EMBEDDED_MODEL}) and dataset ({EMBEDDED_DATA}).",
        epilog="Run `sstoken <command> --help` for a command's options.")
    sub = p.add_subparsers(dest="command", metavar="command")
    for name in ("train", "train-ref"):
        sub.add_parser(name, help=SUBCOMMANDS[name], add_help=False)

    s = sub.add_parser("score", help=SUBCOMMANDS["score"],
                       description="Compute per-token losses of --model over --data once and "
                                   "store them in the cache (keyed by model, data, template and "
                                   "max length); training finds them there.")
    s.add_argument("--model", default=EMBEDDED_MODEL, help="model folder or hub name")
    s.add_argument("--data", default=EMBEDDED_DATA, help="data file, folder or name")
    s.add_argument("--template", default="tulu", choices=["tulu", "chat"], help="chat template")
    s.add_argument("--max-seq-length", type=int, default=2048, help="truncate samples to this")
    s.add_argument("--max-samples", type=int, default=None, help="use only the first N samples")
    s.add_argument("--skip-invalid", action="store_true", help="skip invalid records")
    s.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    s.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    s.add_argument("--cache-dir", default=None, help="cache root (default ~/.cache/sstoken)")

    m = sub.add_parser("merge", help=SUBCOMMANDS["merge"],
                       description="Merge a LoRA adapter into its base and save a full model.")
    m.add_argument("--base", default=EMBEDDED_MODEL, help="base model the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter folder (a train output_dir)")
    m.add_argument("--output", required=True, help="folder for the merged model")
    m.add_argument("--dtype", default="float32", help="dtype of the saved weights")

    d = sub.add_parser("demo", help=SUBCOMMANDS["demo"],
                       description="A few minutes on CPU: LoRA + ssToken on the embedded model "
                                   "and data, then a merged model.")
    d.add_argument("--output-dir", default="outputs/demo", help="where outputs go")
    d.add_argument("--samples", type=int, default=48, help="training samples")
    d.add_argument("--max-seq-length", type=int, default=256, help="truncate samples to this")
    d.add_argument("--method", default="sstoken", help="selection method")

    try:
        from .evaluate import add_compare_parser, add_eval_parser

        add_eval_parser(sub)
        add_compare_parser(sub)
    except ImportError:
        pass
    from .sweep import add_sweep_parser

    add_sweep_parser(sub)
    try:
        from .report import add_show_parser

        add_show_parser(sub)
    except ImportError:
        pass
    return p


def _score(a) -> int:
    from .config import DataArguments, ModelArguments
    from .pipeline import run_score

    data = DataArguments(data=a.data, template=a.template, max_seq_length=a.max_seq_length,
                         skip_invalid=a.skip_invalid, max_samples=a.max_samples)
    run_score(a.model, data, ModelArguments(model=a.model, dtype=a.dtype), a.cache_dir, a.batch_size)
    return 0


def _merge(a) -> int:
    from .pipeline import run_merge

    run_merge(a.base, a.adapter, a.output, a.dtype)
    return 0


def _demo(a) -> int:
    from .demo import run_demo

    run_demo(a.output_dir, a.samples, a.max_seq_length, a.method)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _train(argv[1:])
    if argv and argv[0] == "train-ref":
        return _train_ref(argv[1:])
    p = build_parser()
    a = p.parse_args(argv)
    if a.command is None:
        p.print_help()
        return 0
    handlers = {"score": _score, "merge": _merge, "demo": _demo}
    fn = handlers.get(a.command) or getattr(a, "func", None)
    if fn is None:
        p.error(f"unknown command {a.command}")
    return int(fn(a) or 0)


if __name__ == "__main__":
    sys.exit(main())
