"""``sstoken`` command line: dispatch only.

Each command's options are the dataclasses of :mod:`sstoken.args` (``sstoken <command>
--help`` lists them); the work is done by :mod:`sstoken.runs`, :mod:`sstoken.evaluation`,
:mod:`sstoken.report` and :mod:`sstoken.sweep`. A user's mistake (an option, a config file,
the data) prints one message and exits non-zero without a traceback (codes in
:mod:`sstoken.errors`); ``--debug`` shows the traceback anyway.
"""

from __future__ import annotations

import sys

from .embedded import EMBEDDED_DATA, EMBEDDED_MODEL
from .errors import EXIT_DATA, EXIT_USAGE, UsageError


def _train(model, finetune, data, sel, train_args) -> int:
    from .io import log
    from .runs import train

    s = train(model, finetune, data, sel, train_args)
    log(f"done in {s['seconds']}s: {s['steps']} steps, loss {s['first_loss']} -> {s['last_loss']}; "
        f"outputs in {s['output_dir']}")
    return 0


def _train_ref(model, finetune, data, sel, train_args) -> int:
    """Train the reference model (method full) on the high-quality subset, then merge it so it
    loads as a plain model (``--ref_model <output_dir>/merged``)."""
    from pathlib import Path

    from .io import log
    from .runs import merge, train

    if sel.method != "full":
        raise UsageError("train-ref trains with --method full (the reference is plain SFT)")
    out = Path(train(model, finetune, data, sel, train_args)["output_dir"])
    merged = merge(model, str(out), str(out / "merged")) if finetune.finetune == "lora" else str(out)
    log(f"reference model ready: --ref_model {merged}")
    return 0


def _score(model, data, score_args) -> int:
    from .runs import score

    score(model, data, score_args)
    return 0


def _merge(model, adapter, merge_args) -> int:
    from .runs import merge

    if adapter.adapter is None:
        raise UsageError("--adapter is required")
    merge(model, adapter.adapter, merge_args.output)
    return 0


def _demo(data, sel, demo) -> int:
    from .demo import run_demo

    run_demo(data, sel, demo.output_dir)
    return 0


def _eval(model, adapter, template, score_args, ev) -> int:
    from pathlib import Path

    from .runs import check_model

    check_model(model)                           # before lm-eval, the model or any folder
    created = not Path(ev.output_dir).exists()
    try:
        return _run_eval(model, adapter, template, score_args, ev)
    except BaseException:
        if created and Path(ev.output_dir).is_dir():      # only the task files we wrote
            import shutil

            shutil.rmtree(ev.output_dir, ignore_errors=True)
        raise


def _run_eval(model, adapter, template, score_args, ev) -> int:
    from pathlib import Path

    from .evaluation import evaluate, results_table
    from .io import log

    heldout = None if ev.heldout is None else {
        "data": ev.heldout, "skip": ev.heldout_skip, "samples": ev.heldout_samples,
        "template": template.template, "max_seq_length": template.max_seq_length}
    r = evaluate(model=model.model, adapter=adapter.adapter, preset=ev.preset, tasks=ev.task_list(),
                 limit=ev.limit_value(), batch_size=score_args.batch_size, device=ev.device,
                 num_fewshot=ev.num_fewshot, output_dir=ev.output_dir, dtype=model.dtype,
                 chat_template=ev.apply_chat_template, heldout=heldout)
    print(results_table([r], [adapter.adapter or model.model]))
    log(f"wrote {Path(ev.output_dir) / 'eval.json'} and eval.md in {r['seconds']}s")
    return 0


def _compare(c) -> int:
    from .evaluation import compare
    from .io import log

    res = compare(c.inputs, c.output_dir, labels=c.labels.split(",") if c.labels else None,
                  baseline=c.baseline)
    print(res["markdown"])
    log(f"wrote {res['table']} and {res['plot']}")
    return 0


def _show(model, adapter, data, sel, s) -> int:
    from dataclasses import replace

    from .records import read_scores
    from .report import show
    from .runs import score_records

    if s.scores:
        records = read_scores(s.scores)
    else:                                   # no saved scores: score --model on --data now
        records = []
        for m in s.method_list():
            records += score_records(model, adapter.adapter, data, replace(sel, method=m, scope="auto"),
                                     max_examples=min(s.max_examples, data.max_samples or s.max_examples))
    show(records, output=s.output, title=s.title, trainer_state=s.trainer_state,
         max_examples=s.max_examples)
    return 0


def _sweep(s) -> int:
    from .sweep import run_sweep

    run_sweep(s.spec, dry_run=s.dry_run, only=s.only, no_eval=s.no_eval)
    return 0


HANDLERS = {"train": _train, "score": _score, "train-ref": _train_ref, "merge": _merge,
            "demo": _demo, "eval": _eval, "compare": _compare, "show": _show, "sweep": _sweep}


def usage() -> str:
    from .args import COMMANDS

    width = max(map(len, COMMANDS))
    lines = ["usage: sstoken <command> [options]   (sstoken <command> --help for its options)", "",
             "Token selection for supervised fine-tuning: ssToken (ICLR 2026) and the baselines "
             "full, random, rho1, tokencleaning.",
             f"Runs offline on an embedded model ({EMBEDDED_MODEL}) and dataset ({EMBEDDED_DATA}).",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (text, _) in COMMANDS.items()]
    lines += ["", "Every command takes --config FILE.yaml (option names as keys; flags override it) "
              "and --debug (tracebacks for errors)."]
    return "\n".join(lines)


def _error_types() -> tuple[type, ...]:
    """Errors that are the user's to fix (data, cache, report input)."""
    from .cache import CacheError
    from .data import DataError
    from .records import ReportError

    return DataError, CacheError, ReportError, FileNotFoundError


def main(argv: list[str] | None = None) -> int:
    from .args import COMMANDS, parse

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sstoken: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    options = ()
    try:
        options = parse(command, rest)
        return int(HANDLERS[command](*options) or 0)
    except UsageError as e:
        if debug:
            raise
        problems = "\n".join(f"  {p}" for p in e.problems)
        print(f"sstoken {command}: error:\n{problems}" if len(e.problems) > 1
              else f"sstoken {command}: error: {e.problems[0]}", file=sys.stderr)
        return EXIT_USAGE
    except _error_types() as e:
        if debug:
            raise
        print(f"sstoken {command}: error: {e}", file=sys.stderr)
        return EXIT_DATA
    except KeyboardInterrupt:
        print(f"sstoken {command}: interrupted; {_what_was_kept(options)}", file=sys.stderr)
        return 130


def _what_was_kept(options: tuple) -> str:
    """One line for Ctrl-C: what is on disk, and how to continue."""
    from .args import TrainArguments
    from .trainer import last_complete_checkpoint

    train_args = next((o for o in options if isinstance(o, TrainArguments)), None)
    if train_args is not None:
        ckpt = last_complete_checkpoint(str(train_args.output_dir))
        if ckpt:
            return (f"the last complete checkpoint is {ckpt}: continue with the same command and "
                    "--resume_from_checkpoint true")
        return ("no checkpoint was written (--save_strategy steps --save_steps N makes runs "
                "resumable); files already written are complete")
    return "files already written are complete (each is written whole or not at all)"


if __name__ == "__main__":
    sys.exit(main())
