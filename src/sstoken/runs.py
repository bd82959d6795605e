"""The steps with side effects - score, train, self-evolving rounds, merge, score without
training. The command line and the Python API (``sstoken.train`` ...) call these.

Every step takes the dataclasses of :mod:`sstoken.args` (already checked), prints what it did
(rank 0) and writes its outputs atomically.
"""

from __future__ import annotations

import json
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
    if not examples:
        from .data import DataError

        raise DataError(f"{d.data}: no usable examples ({stats.summary()})")
    return examples, stats


# --------------------------------------------------------------------------- scoring pass

def score(model_args: ModelArguments, data_args: DataArguments,
          score_args: ScoreArguments | None = None) -> Path:
    """``sstoken score``: compute and cache ``model``'s per-token losses over the data."""
    score_args = score_args or ScoreArguments()
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


def train(model_args: ModelArguments, finetune_args: FinetuneArguments, data_args: DataArguments,
          sel_args: SelectionArguments, train_args: TrainArguments) -> dict:
    """``sstoken train``: load data, let the method prepare what it needs, train, save."""
    t0 = time.time()
    out_dir = Path(train_args.output_dir)
    tok = load_tokenizer(model_args.model)
    examples, stats = load_data(data_args, tok)
    method = get_method(sel_args)
    losses = LossProvider(model_args, data_args, train_args.per_device_eval_batch_size)
    facts = method.prepare(examples, losses)
    for k, v in facts.items():
        log(f"{k.replace('_', ' ')}: {v}")
    if getattr(method, "self_evolving", False):
        return train_self_evolving(model_args, finetune_args, data_args, sel_args, train_args,
                                   tok, examples, t0)
    model = build_model(model_args, finetune_args, train_args.seed)
    trainer = train_once(model, tok, examples, model_args, sel_args, train_args, out_dir)
    return _finish(trainer, model_args, finetune_args, data_args, sel_args, stats, out_dir, t0, facts)


def _finish(trainer, model_args, finetune_args, data_args, sel_args, stats, out_dir, t0, extra):
    trainer.save_model(str(out_dir))          # adapter (LoRA) or full weights, + tokenizer
    trainer.save_state()
    main_process = trainer.is_world_process_zero()
    scores = trainer.write_records(str(out_dir / "selection.jsonl")) if main_process else None
    hist = [h for h in trainer.state.log_history if "loss" in h]
    summary = {
        "method": sel_args.method, "rho": sel_args.rho, "gamma": sel_args.gamma,
        "examples": stats.examples, "tokens": stats.tokens, "response_tokens": stats.response_tokens,
        "steps": trainer.state.global_step, "seconds": round(time.time() - t0, 1),
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
