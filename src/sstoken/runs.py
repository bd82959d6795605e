"""The steps with side effects - score, train, self-evolving rounds, merge, score without
training. The command line and the Python API (``sstoken.train`` ...) call these.

Every step takes the dataclasses of :mod:`sstoken.args` (already checked), prints what it did
(rank 0) and writes its outputs atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .args import (DataArguments, FinetuneArguments, ModelArguments, ScoreArguments,
                   SelectionArguments, TrainArguments, to_dict)
from .data import Collator, ExampleDataset, LoadStats, load_examples
from .io import atomic_write, is_main_process, log
from .losses import LossProvider, compute_losses
from .methods import get_method
from .methods.tokencleaning import pool_keep
from .modeling import add_lora, load_model, load_tokenizer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_data(data_args: DataArguments, tok, limit: int | None = None):
    """Examples and their load statistics, or a DataError naming the file and line."""
    d = data_args
    examples, stats = load_examples(d.data, tok, template=d.template, max_seq_length=d.max_seq_length,
                                    skip_invalid=d.skip_invalid,
                                    limit=d.max_samples if limit is None else limit, split=d.split,
                                    skip=d.skip_samples)
    log(f"data: {stats.summary()}")
    for r in stats.invalid_reasons[:3]:
        log(f"  skipped {r}")
    if len(stats.skipped) > 3:
        log(f"  ... and {len(stats.skipped) - 3} more (all in skipped.jsonl of the output folder)")
    if not examples:
        from .errors import DataError

        first = f"; first skipped: {stats.invalid_reasons[0]}" if stats.skipped else ""
        raise DataError(f"{d.data}: no usable examples ({stats.summary()}){first}")
    return examples, stats


def write_skipped(stats, out_dir: Path) -> Path | None:
    """``skipped.jsonl``: one line per record ``--skip_invalid`` skipped (file, line, reason)."""
    if not stats.skipped or not is_main_process():
        return None
    lines = "".join(json.dumps({k: v for k, v in s.items() if v is not None}) + "\n"
                    for s in stats.skipped)
    return atomic_write(Path(out_dir) / "skipped.jsonl", lines)


# --------------------------------------------------------------------------- scoring pass

def score(model_args: ModelArguments, data_args: DataArguments,
          score_args: ScoreArguments | None = None) -> Path:
    """``sstoken score``: compute and cache ``model``'s per-token losses over the data."""
    score_args = score_args or ScoreArguments()
    check_model(model_args)
    examples, stats = load_data(data_args, load_tokenizer(model_args.model))
    t0 = time.time()
    out = LossProvider(model_args, data_args, score_args.batch_size).attach(
        model_args.model, examples, "history_loss")
    log(f"{stats.tokens} tokens in {time.time() - t0:.1f}s -> {out}")
    return out


# --------------------------------------------------------------------------- training

def build_model(model_args: ModelArguments, finetune_args: FinetuneArguments, seed: int):
    """The model to train; the LoRA adapter is initialized from ``seed`` (same seed = same
    adapter, whatever ran before)."""
    from transformers import set_seed

    model = load_model(model_args.model, model_args.dtype, model_args.attn_implementation)
    if finetune_args.finetune == "lora":
        set_seed(seed)
        f = finetune_args
        model = add_lora(model, f.lora_r, f.lora_alpha, f.lora_dropout, f.lora_target_modules)
    return model


def train_once(model, tok, examples, model_args, sel_args, train_args, out_dir: Path):
    from .trainer import SelectionTrainer

    args = replace(train_args, output_dir=str(out_dir))
    trainer = SelectionTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                               data_collator=Collator(tok.pad_token_id), processing_class=tok,
                               selection=sel_args, loss_chunk_size=model_args.loss_chunk_size,
                               examples=examples)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return trainer


RUN_FILES = ("sstoken_run.json", "selection.jsonl", "trainer_state.json", "adapter_model.safetensors",
             "model.safetensors", "skipped.jsonl")


def check_output_dir(train_args: TrainArguments, sel_args: SelectionArguments) -> str | None:
    """Before any work: the output folder can be written, does not hold an earlier run unless
    resuming or ``--overwrite_output_dir``, and the checkpoint to resume from exists and is
    complete. Returns the checkpoint folder to resume from, or None."""
    from .errors import UsageError
    from .trainer import STATE_FILE, last_complete_checkpoint

    out = Path(train_args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder")
    resume = train_args.resume_from_checkpoint
    if resume is not None and str(resume).lower() in ("false", "no", "none", ""):
        resume = None
    if resume is not None and getattr(get_method(sel_args), "self_evolving", False):
        raise UsageError("--resume_from_checkpoint is not supported with --tc_mode self_evolving "
                         "(its rounds retrain from the partitions); run it again from the start")
    if resume is not None and str(resume).lower() in ("true", "auto", "last", "yes"):
        found = last_complete_checkpoint(str(out))
        if found is None:
            raise UsageError(f"--resume_from_checkpoint {resume}: {out} has no complete checkpoint "
                             "(checkpoint-N with trainer_state.json and sstoken_state.json)")
        return found
    if resume is not None:
        p = Path(resume)
        if not (p / "trainer_state.json").exists() or not (p / STATE_FILE).exists():
            raise UsageError(f"--resume_from_checkpoint {resume}: not a complete sstoken checkpoint "
                             "(needs trainer_state.json and sstoken_state.json)")
        return str(p)
    earlier = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-") or p.name in RUN_FILES] \
        if out.is_dir() else []
    if earlier and not train_args.overwrite_output_dir:
        raise UsageError(f"--output_dir {out} holds an earlier run ({', '.join(sorted(earlier)[:4])}"
                         f"{' ...' if len(earlier) > 4 else ''}): continue it with "
                         "--resume_from_checkpoint true, replace it with --overwrite_output_dir "
                         "true, or choose another folder")
    return None


def _clear_earlier_run(out: Path) -> None:
    """``--overwrite_output_dir``: remove an earlier run's checkpoints and outputs."""
    import shutil

    for p in list(out.iterdir()) if out.is_dir() else []:
        if p.is_dir() and (p.name.startswith("checkpoint-") or p.name.startswith("round")):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name in RUN_FILES or p.name in ("adapter_config.json", "config.json"):
            p.unlink(missing_ok=True)


def check_model(model_args: ModelArguments, sel_args: SelectionArguments | None = None) -> None:
    """Checks that need the model's config but not its weights: a local model folder exists,
    and ``--attn_layer`` is within its layers."""
    from transformers import AutoConfig

    from .attention import resolve_layer
    from .embedded import resolve_model
    from .errors import UsageError

    name = model_args.model
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not (Path(name).expanduser() / "config.json").exists():
        raise UsageError(f"--model {name}: not a model folder (no config.json there)")
    try:
        config = AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {name}: cannot read its config ({str(e).splitlines()[0]})") from None
    if sel_args is not None and sel_args.method == "sstoken" and \
            (sel_args.gamma < 1 or sel_args.rel_warmup > 0):
        try:
            resolve_layer(sel_args.attn_layer, config.num_hidden_layers)
        except ValueError as e:
            raise UsageError(f"--{e}") from None


def _deepspeed_config(train_args: TrainArguments) -> dict | None:
    """``--deepspeed`` as a dict: given as one, as a file, or as the JSON itself (transformers
    takes all three). None when absent or unreadable (transformers reports the latter)."""
    ds = train_args.deepspeed
    if isinstance(ds, str):
        try:
            ds = json.loads(Path(ds).read_text() if Path(ds).is_file() else ds)
        except (OSError, ValueError):
            return None
    return ds if isinstance(ds, dict) else None


def engine(train_args: TrainArguments) -> tuple[str, int]:
    """The distributed engine this run will use, from the Trainer's options or the variables
    ``accelerate launch`` sets: ``("ddp" | "fsdp" | "deepspeed", ZeRO stage or 0)``."""
    env = os.environ
    if train_args.fsdp or env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp", 0
    if train_args.deepspeed or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        stage = (_deepspeed_config(train_args) or {}).get("zero_optimization", {}).get("stage", stage)
        return "deepspeed", int(stage or 0)
    return "ddp", 0


def is_sharded(train_args: TrainArguments) -> bool:
    """FSDP or ZeRO-3: no GPU holds the whole model (a frozen whole copy per GPU is refused)."""
    return engine(train_args) in (("fsdp", 0), ("deepspeed", 3))


def fsdp_version(train_args: TrainArguments) -> int:
    """1 or 2: from ``--fsdp_config`` (transformers' default 2), else from what ``accelerate
    launch`` set (accelerate's default 1)."""
    if train_args.fsdp:
        return int((train_args.fsdp_config or {}).get("version", 2))
    return int(os.environ.get("FSDP_VERSION", "1"))


def zero3_saves_whole_model(train_args: TrainArguments) -> bool:
    """Whether ZeRO-3 gathers the weights when the model is saved (otherwise transformers
    writes only DeepSpeed's own checkpoint, and a full fine-tuning run ends with no model)."""
    flag = (_deepspeed_config(train_args) or {}).get("zero_optimization", {}).get(
        "stage3_gather_16bit_weights_on_model_save",
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false"))
    return str(flag).lower() in ("1", "true")


def check_launch(model_args: ModelArguments, finetune_args: FinetuneArguments,
                 sel_args: SelectionArguments, train_args: TrainArguments) -> None:
    """Refuse, before anything loads, what cannot work: several GPUs without a launcher (the
    Trainer would fall into ``nn.DataParallel``, whose replicas share sstoken's hooks), and a
    frozen whole copy of the model per GPU under FSDP or DeepSpeed (see README, Several GPUs).
    Everything else runs on every engine (tests/test_engines.py)."""
    from .errors import UsageError

    problems = []
    gpus = torch.cuda.device_count() if not train_args.use_cpu else 0
    if gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        problems.append(
            f"{gpus} GPUs are visible but this is one process: launch one process per GPU with "
            f"`torchrun --nproc_per_node {gpus} -m sstoken.cli train ...` or `accelerate launch "
            "--config_file configs/accelerate/ddp.yaml -m sstoken.cli train ...`, or train on "
            "one GPU with CUDA_VISIBLE_DEVICES=0")
    name, stage = engine(train_args)
    sharded = is_sharded(train_args)
    label = "FSDP" if name == "fsdp" else f"DeepSpeed ZeRO-{stage}"
    if name == "fsdp" and fsdp_version(train_args) == 1:
        problems.append("FSDP1 is not supported (deprecated in transformers, and not tested "
                        "here; it crashed in the chunked loss and the history forward): use "
                        "FSDP2, fsdp_version: 2 in an accelerate config (configs/accelerate/"
                        "fsdp2.yaml) or --fsdp_config '{\"version\": 2}'")
    if (sharded and finetune_args.finetune == "full" and sel_args.method == "sstoken"
            and sel_args.gamma > 0 and sel_args.history == "base" and sel_args.history_losses == "online"):
        problems.append(f"--finetune full with online base history under {label} needs a frozen "
                        "unsharded copy of the model on every GPU: run `sstoken score` first and "
                        "train with --history_losses auto (the cache)")
    if name == "deepspeed" and stage == 3 and finetune_args.finetune == "full" and \
            not zero3_saves_whole_model(train_args):
        problems.append("--finetune full under DeepSpeed ZeRO-3 would end with no model file: set "
                        "zero_optimization.stage3_gather_16bit_weights_on_model_save true in the "
                        "DeepSpeed config (zero3_save_16bit_model: true in an accelerate config, "
                        "as configs/accelerate/zero3.yaml does)")
    if sharded and finetune_args.finetune == "full" and sel_args.weighting == "asft":
        problems.append(f"--weighting asft with --finetune full under {label} needs a frozen "
                        "unsharded copy of the base on every GPU; use LoRA (the adapter-disabled "
                        "network is the reference)")
    if (finetune_args.finetune == "lora" and model_args.loss_chunk_size > 0 and "lm_head" in
            [t.strip() for t in finetune_args.lora_target_modules.split(",")]):
        problems.append("--lora_target_modules lm_head with the chunked loss: the chunked loss "
                        "projects with the head's base weight; leave lm_head out or use "
                        "--loss_chunk_size 0")
    if problems:
        raise UsageError(problems)


def train(model_args: ModelArguments, finetune_args: FinetuneArguments, data_args: DataArguments,
          sel_args: SelectionArguments, train_args: TrainArguments) -> dict:
    """``sstoken train``: check the output folder and the model's config, load data, let the
    method prepare what it needs, train, save. A run that fails leaves no empty folder behind."""
    t0 = time.time()
    out_dir = Path(train_args.output_dir)
    resume = check_output_dir(train_args, sel_args)
    check_launch(model_args, finetune_args, sel_args, train_args)
    check_model(model_args, sel_args)
    created = not out_dir.exists()
    try:
        tok = load_tokenizer(model_args.model)
        examples, stats = load_data(data_args, tok)
        method = get_method(sel_args)
        losses = LossProvider(model_args, data_args, train_args.per_device_eval_batch_size)
        facts = method.prepare(examples, losses)
        if (facts.get("history_losses") == "online" and finetune_args.finetune == "full"
                and is_sharded(train_args)):
            from .errors import UsageError

            raise UsageError("--finetune full with online base history under a sharded engine "
                             "needs a frozen unsharded copy per GPU, and no cache entry matches: "
                             "run `sstoken score` with the same model and data first")
        for k, v in facts.items():
            log(f"{k.replace('_', ' ')}: {v}")
        if resume is None and train_args.overwrite_output_dir and is_main_process():
            _clear_earlier_run(out_dir)
        facts["skipped"] = str(write_skipped(stats, out_dir)) if stats.skipped else None
        if getattr(method, "self_evolving", False):
            return train_self_evolving(model_args, finetune_args, data_args, sel_args, train_args,
                                       tok, examples, t0)
        model = build_model(model_args, finetune_args, train_args.seed)
        trainer = train_once(model, tok, examples, model_args, sel_args,
                             replace(train_args, resume_from_checkpoint=resume), out_dir)
        return _finish(trainer, model_args, finetune_args, data_args, sel_args, stats, out_dir,
                       t0, facts)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _finish(trainer, model_args, finetune_args, data_args, sel_args, stats, out_dir, t0, extra):
    fsdp = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if fsdp is not None:          # FSDP's sharded state dict would leave no weights file at all
        fsdp.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out_dir))          # adapter (LoRA) or full weights, + tokenizer
    trainer.save_state()
    main_process = trainer.is_world_process_zero()
    scores = trainer.write_records(str(out_dir / "selection.jsonl"))     # every rank: gathered
    hist = [h for h in trainer.state.log_history if "loss" in h]
    summary = {
        "method": sel_args.method, "rho": sel_args.rho, "gamma": sel_args.gamma,
        "examples": stats.examples, "tokens": stats.tokens, "response_tokens": stats.response_tokens,
        "steps": trainer.state.global_step,
        "seconds": round(time.time() - t0 + trainer.seconds_before, 1),     # including before a resume
        "first_loss": hist[0]["loss"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None,
        "kept_frac": [h.get("sel/kept_frac") for h in hist],
        "output_dir": str(out_dir), "scores": scores, **extra,
        "config": to_dict(model_args, finetune_args, data_args, sel_args),
    }
    if main_process:
        atomic_write(out_dir / "sstoken_run.json", json.dumps(summary, indent=2, default=str))
    return summary


def train_self_evolving(model_args, finetune_args, data_args, sel_args, train_args, tok,
                        examples, t0) -> dict:
    """TokenCleaning self-evolving: K contiguous partitions; round 0 trains on partition 0 with
    all tokens; round t >= 1 scores partition t by ``loss_base - loss_model(t-1)``, keeps the
    global top ``floor(rho * N_t)`` of the partition, and continues training the same model."""
    K = sel_args.tc_partitions
    if K > len(examples):
        from .errors import UsageError

        raise UsageError(f"--tc_partitions {K} is more than the {len(examples)} examples")
    bounds = [round(k * len(examples) / K) for k in range(K + 1)]
    parts = [examples[bounds[k]:bounds[k + 1]] for k in range(K)]
    model = build_model(model_args, finetune_args, train_args.seed)
    out_dir = Path(train_args.output_dir)
    trainer, rounds = None, []
    for t, part in enumerate(parts):
        if t == 0:
            round_sel = replace(sel_args, method="full")
            for e in part:
                e.extra.pop("base_loss", None)
        else:
            prev = compute_losses(model, part, tok.pad_token_id,
                                  batch_size=train_args.per_device_train_batch_size,
                                  chunk_size=model_args.loss_chunk_size, desc=f"round {t}: scoring with model {t - 1}")
            for e, l in zip(part, prev):
                e.extra["ref_loss"] = l.tolist()
            pool_keep(part, sel_args.rho, "pool")
            round_sel = sel_args
        model.train()
        n_resp = sum(e.num_response_tokens for e in part)
        n_keep = n_resp if t == 0 else int(sum(sum(e.extra["keep"]) for e in part))
        rounds.append({"round": t, "examples": [e.id for e in part], "response_tokens": n_resp,
                       "kept_tokens": n_keep})
        log(f"round {t}/{K - 1}: {len(part)} examples, method {round_sel.method}, "
            f"keeping {n_keep}/{n_resp} tokens")
        trainer = train_once(model, tok, part, model_args, round_sel, train_args, out_dir / f"round{t}")
    stats = LoadStats(examples=len(examples), records=len(examples),
                      tokens=sum(len(e.input_ids) for e in examples),
                      response_tokens=sum(e.num_response_tokens for e in examples))
    return _finish(trainer, model_args, finetune_args, data_args, sel_args, stats, out_dir, t0,
                   {"rounds": rounds})


# --------------------------------------------------------------------------- merge, show

def merge(model_args: ModelArguments, adapter: str, output: str) -> str:
    """``sstoken merge``: the adapter merged into its base, saved as a plain model."""
    from .modeling import merge_and_save

    check_model(model_args)
    path = merge_and_save(model_args.model, adapter, output,
                          "float32" if model_args.dtype == "auto" else model_args.dtype)
    log(f"merged {adapter} into {model_args.model} -> {path}")
    return path


def score_records(model_args: ModelArguments, adapter: str | None, data_args: DataArguments,
                  sel_args: SelectionArguments, max_examples: int = 50,
                  batch_size: int = 4) -> list[dict]:
    """Score and select without training (``sstoken show`` without ``--scores``).

    With ``adapter`` (a trained LoRA) the history model is the base (adapter disabled) and the
    current model is base + adapter, so REL shows what training has learned; without one the
    two coincide and REL is 0 (attention alone decides, as at the first training step).
    Reference losses for rho1/tokencleaning come from the cache (computed if absent).
    """
    from transformers import TrainingArguments

    from .trainer import SelectionTrainer

    check_model(model_args, sel_args)
    tok = load_tokenizer(model_args.model)
    examples, _ = load_data(data_args, tok, limit=max_examples)
    method = get_method(sel_args)
    if sel_args.method != "sstoken":          # sstoken's history here is the adapter-less base
        method.prepare(examples, LossProvider(model_args, data_args))
    m = load_model(model_args.model, model_args.dtype, model_args.attn_implementation)
    m = m.to(default_device())
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
    sel = replace(sel_args, save_scores=len(examples))
    device = default_device()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to="none", remove_unused_columns=False,
                                 use_cpu=device.type == "cpu")
        trainer = SelectionTrainer(model=m, args=args, selection=sel, processing_class=tok,
                                   loss_chunk_size=model_args.loss_chunk_size, examples=examples)
        collate, ds = Collator(tok.pad_token_id), ExampleDataset(examples)
        from .progress import progress

        for s in progress(range(0, len(examples), batch_size), desc="scoring"):
            batch = collate([ds[k] for k in range(s, min(s + batch_size, len(examples)))])
            trainer.score_batch({k: v.to(device) for k, v in batch.items()})
    return list(trainer.records.values())


__all__ = ["score", "train", "train_self_evolving", "merge", "score_records", "build_model",
           "load_data", "is_main_process"]
