"""End-to-end steps with side effects: score a dataset, train, merge. The CLI calls these.

Each step prints what it did; long loops show a tqdm bar (quiet when not on a terminal).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import cache as cache_mod
from .cache import CacheError
from .config import DataArguments, ModelArguments, SelectionArguments, to_dict
from .data import Collator, Example, ExampleDataset, load_examples
from .embedded import cache_dir, resolve_model
from .progress import progress
from .modeling import add_lora, forward_token_losses, load_model, load_tokenizer, pick_dtype
from .scoring import num_keep, select_top_flat, select_top_per_sample


def log(msg: str) -> None:
    print(f"[sstoken] {msg}", flush=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- scoring pass

@torch.no_grad()
def compute_losses(model, examples: list[Example], pad_token_id: int, batch_size: int = 8,
                   chunk_size: int = 1024, desc: str = "scoring") -> list[torch.Tensor]:
    """Per-token losses ``(L_k,)`` of every example under ``model`` (no grad, eval mode).

    Batches are formed from length-sorted examples so little compute is spent on padding.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda k: len(examples[k].input_ids))
    collate = Collator(pad_token_id)
    out: list[torch.Tensor | None] = [None] * len(examples)
    ds = ExampleDataset([Example(e.id, e.input_ids, e.labels) for e in examples])
    bar = progress(total=sum(len(e.input_ids) for e in examples), desc=desc, unit="tok")
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([ds[k] for k in idx])
        ids = batch["input_ids"].to(device)
        am = batch["attention_mask"].to(device)
        resp = batch["labels"].to(device) != -100
        resp[:, 0] = False
        losses = forward_token_losses(model, ids, am, resp, chunk_size).cpu()
        for b, k in enumerate(idx):
            out[k] = losses[b, :len(examples[k].input_ids)].clone()
        bar.update(int(am.sum()))
    bar.close()
    return out  # type: ignore[return-value]


def losses_for(model_name: str, examples: list[Example], data_args: DataArguments,
               model_args: ModelArguments, root: Path, field: str, compute: bool = True,
               batch_size: int = 8) -> Path | None:
    """Attach ``model_name``'s per-token losses to ``examples.extra[field]`` from the cache,
    computing and caching them first when ``compute``. Returns the cache entry's folder, or
    None when it is absent and ``compute`` is False."""
    path = resolve_model(model_name)
    fp = cache_mod.model_fingerprint(path)
    key = cache_mod.cache_key(fp, examples, data_args.template, data_args.max_seq_length)
    found = cache_mod.find(root, key)
    if found is None:
        if not compute:
            return None
        log(f"scoring {len(examples)} examples with {model_name} (cached for later runs)")
        model = load_model(model_name, model_args.dtype, model_args.attn_implementation)
        model.to(default_device())
        tok = load_tokenizer(model_name)
        losses = compute_losses(model, examples, tok.pad_token_id, batch_size,
                                model_args.loss_chunk_size, desc=f"scoring {Path(path).name}")
        meta = {"model": model_name, "model_fingerprint": fp, "data": data_args.data,
                "template": data_args.template, "max_seq_length": data_args.max_seq_length}
        cache_mod.write(root, key, meta, examples, losses)
        found = cache_mod.find(root, key)
        del model
    else:
        log(f"using cached losses of {model_name}: {found.path}")
    found.attach(examples, field)
    return found.path


def run_score(model: str, data_args: DataArguments, model_args: ModelArguments,
              cache_root: str | None = None, batch_size: int = 8) -> Path:
    """``sstoken score``: compute and cache a model's per-token losses over a dataset."""
    tok = load_tokenizer(model)
    examples, stats = load_examples(data_args.data, tok, data_args.template,
                                    data_args.max_seq_length, data_args.skip_invalid,
                                    data_args.max_samples, data_args.split, data_args.skip_samples)
    log(stats.summary())
    root = Path(cache_root) if cache_root else cache_dir()
    t0 = time.time()
    out = losses_for(model, examples, data_args, model_args, root, "history_loss", batch_size=batch_size)
    log(f"{stats.tokens} tokens in {time.time() - t0:.1f}s -> {out}")
    return out


# --------------------------------------------------------------------------- TokenCleaning

def tokencleaning_keep(examples: list[Example], rho: float, scope: str,
                       base_field: str = "base_loss", ref_field: str = "ref_loss") -> None:
    """TokenCleaning (fixed model): score = loss_base - loss_reference, keep the top
    ``floor(rho * N)`` over all N response tokens of the pool (scope ``pool``; ties by file
    order then position) or ``ceil(rho * |R|)`` per sample (scope ``sample``). Writes
    ``example.extra["keep"]`` (1.0 / 0.0 per token); data order is kept as in the file."""
    if not examples:
        return
    L = max(len(e.input_ids) for e in examples)
    B = len(examples)
    score = torch.zeros(B, L, dtype=torch.float64)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        lab = torch.tensor(e.labels)
        m = lab != -100
        m[0] = False
        mask[b, :n] = m
        score[b, :n] = torch.tensor(e.extra[base_field], dtype=torch.float64) - \
            torch.tensor(e.extra[ref_field], dtype=torch.float64)
    if scope == "pool":
        keep = select_top_flat(score, mask, math.floor(round(rho * int(mask.sum()), 9)))
    else:
        keep = select_top_per_sample(score, mask, rho)
    for b, e in enumerate(examples):
        e.extra["keep"] = keep[b, :len(e.input_ids)].float().tolist()
        e.extra.pop(base_field, None)
        e.extra.pop(ref_field, None)


# --------------------------------------------------------------------------- training

def build_model(model_args: ModelArguments):
    model = load_model(model_args.model, model_args.dtype, model_args.attn_implementation)
    if model_args.finetune == "lora":
        model = add_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                         model_args.lora_target_modules)
    elif model_args.finetune != "full":
        raise ValueError(f"finetune must be lora or full, got {model_args.finetune!r}")
    return model


def _train_once(model, tok, examples, model_args, sel_args, train_args, out_dir: Path):
    from .trainer import SelectionTrainer

    args = replace(train_args, output_dir=str(out_dir))
    trainer = SelectionTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                               data_collator=Collator(tok.pad_token_id), processing_class=tok,
                               selection=sel_args, loss_chunk_size=model_args.loss_chunk_size,
                               examples=examples)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return trainer, result


def _restore_attn(model, impl: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != impl:
        base.set_attn_implementation(impl)


def run_train(model_args: ModelArguments, data_args: DataArguments, sel_args: SelectionArguments,
              train_args) -> dict:
    """``sstoken train``: load data, attach cached losses the method needs, train, save."""
    t0 = time.time()
    out_dir = Path(train_args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model_args.model)
    examples, stats = load_examples(data_args.data, tok, data_args.template,
                                    data_args.max_seq_length, data_args.skip_invalid,
                                    data_args.max_samples, data_args.split, data_args.skip_samples)
    log(f"data: {stats.summary()}")
    if not examples:
        raise ValueError(f"{data_args.data}: no usable examples")
    root = Path(sel_args.cache_dir) if sel_args.cache_dir else cache_dir()
    m = sel_args.method
    history_source = None
    if m == "sstoken" and sel_args.gamma > 0 and sel_args.history == "base":
        if sel_args.history_losses not in ("auto", "online"):
            c = cache_mod.read(Path(sel_args.history_losses))
            cache_mod.check_meta(c, cache_mod.model_fingerprint(resolve_model(model_args.model)),
                                 data_args.template, data_args.max_seq_length)
            c.attach(examples, "history_loss")
            history_source = str(c.path)
        elif sel_args.history_losses == "auto" and losses_for(
                model_args.model, examples, data_args, model_args, root, "history_loss",
                compute=False):
            history_source = "cache"
        else:
            history_source = "online"
        log(f"history losses: {history_source}")
    if m == "rho1":
        losses_for(sel_args.ref_model, examples, data_args, model_args, root, "ref_loss")
    if m == "tokencleaning" and sel_args.tc_mode == "self_evolving":
        return run_self_evolving(model_args, data_args, sel_args, train_args, tok, examples, root, t0)
    if m == "tokencleaning":
        losses_for(model_args.model, examples, data_args, model_args, root, "base_loss")
        losses_for(sel_args.ref_model, examples, data_args, model_args, root, "ref_loss")
        tokencleaning_keep(examples, sel_args.rho, sel_args.scope if sel_args.scope != "batch" else "pool")
    model = build_model(model_args)
    trainer, result = _train_once(model, tok, examples, model_args, sel_args, train_args, out_dir)
    return _finish(trainer, model, tok, model_args, data_args, sel_args, stats, out_dir, t0,
                   {"history_losses": history_source})


def _finish(trainer, model, tok, model_args, data_args, sel_args, stats, out_dir, t0, extra):
    _restore_attn(model, model_args.attn_implementation)
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
        "config": {k: v for k, v in to_dict(model_args, data_args, sel_args).items()},
    }
    if main_process:
        tmp = out_dir / "sstoken_run.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(out_dir / "sstoken_run.json")
    return summary


def run_self_evolving(model_args, data_args, sel_args, train_args, tok, examples, root, t0) -> dict:
    """TokenCleaning self-evolving: K contiguous partitions; round 0 trains on partition 0 with
    all tokens; round t >= 1 scores partition t by ``loss_base - loss_model(t-1)``, keeps the
    global top ``floor(rho * N_t)`` of the partition, and continues training the same model."""
    K = sel_args.tc_partitions
    if K < 1 or K > len(examples):
        raise ValueError(f"tc_partitions must be in [1, {len(examples)}], got {K}")
    bounds = [round(k * len(examples) / K) for k in range(K + 1)]
    parts = [examples[bounds[k]:bounds[k + 1]] for k in range(K)]
    losses_for(model_args.model, examples, data_args, model_args, root, "base_loss")
    model = build_model(model_args)
    out_dir = Path(train_args.output_dir)
    trainer, rounds = None, []
    for t, part in enumerate(parts):
        if t == 0:
            round_sel = replace(sel_args, method="full")
            for e in part:
                e.extra.pop("base_loss", None)
        else:
            prev = compute_losses(model, part, tok.pad_token_id, train_args.per_device_train_batch_size,
                                  model_args.loss_chunk_size, desc=f"round {t}: scoring with model {t - 1}")
            for e, l in zip(part, prev):
                e.extra["ref_loss"] = l.tolist()
            tokencleaning_keep(part, sel_args.rho, "pool")
            round_sel = sel_args
        model.train()
        n_resp = sum(e.num_response_tokens for e in part)
        n_keep = n_resp if t == 0 else int(sum(sum(e.extra["keep"]) for e in part))
        rounds.append({"round": t, "examples": [e.id for e in part], "response_tokens": n_resp,
                       "kept_tokens": n_keep})
        log(f"round {t}/{K - 1}: {len(part)} examples, method {round_sel.method}, "
            f"keeping {n_keep}/{n_resp} tokens")
        trainer, _ = _train_once(model, tok, part, model_args, round_sel, train_args, out_dir / f"round{t}")
    return _finish(trainer, model, tok, model_args, data_args, sel_args,
                   _stats_of(examples), out_dir, t0, {"rounds": rounds})


def _stats_of(examples):
    from .data import LoadStats

    s = LoadStats(examples=len(examples), records=len(examples))
    s.tokens = sum(len(e.input_ids) for e in examples)
    s.response_tokens = sum(e.num_response_tokens for e in examples)
    return s


def run_merge(base: str, adapter: str, out_dir: str, dtype: str = "float32") -> str:
    from .modeling import merge_and_save

    path = merge_and_save(resolve_model(base), adapter, out_dir, dtype)
    log(f"merged {adapter} into {base} -> {path}")
    return path


def run_score_records(model: str, adapter: str | None, data_args: DataArguments,
                      sel_args: SelectionArguments, model_args: ModelArguments | None = None,
                      max_examples: int = 50, batch_size: int = 4, cache_root: str | None = None,
                      ) -> list[dict]:
    """Score and select without training (for ``sstoken show --model ... --data ...``).

    With ``adapter`` (a trained LoRA) the history model is the base (adapter disabled) and the
    current model is base + adapter, so REL shows what training has learned; without one the
    two coincide and REL is 0 (attention alone decides, as at the first training step).
    Reference losses for rho1/tokencleaning come from the cache (computed if absent).
    """
    from transformers import TrainingArguments

    from .trainer import SelectionTrainer

    model_args = model_args or ModelArguments(model=model)
    tok = load_tokenizer(model)
    examples, stats = load_examples(data_args.data, tok, data_args.template,
                                    data_args.max_seq_length, data_args.skip_invalid,
                                    max_examples, data_args.split, data_args.skip_samples)
    log(f"data: {stats.summary()}")
    root = Path(cache_root) if cache_root else cache_dir()
    if sel_args.method == "rho1":
        losses_for(sel_args.ref_model, examples, data_args, model_args, root, "ref_loss")
    if sel_args.method == "tokencleaning":
        losses_for(model, examples, data_args, model_args, root, "base_loss")
        losses_for(sel_args.ref_model, examples, data_args, model_args, root, "ref_loss")
        tokencleaning_keep(examples, sel_args.rho, sel_args.scope if sel_args.scope != "batch" else "pool")
    m = load_model(model, model_args.dtype, model_args.attn_implementation).to(default_device())
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
    sel = replace(sel_args, save_scores=len(examples))
    args = TrainingArguments(output_dir="/tmp/sstoken-score-records", report_to="none",
                             remove_unused_columns=False, use_cpu=default_device().type == "cpu")
    trainer = SelectionTrainer(model=m, args=args, selection=sel, processing_class=tok,
                               loss_chunk_size=model_args.loss_chunk_size, examples=examples)
    collate = Collator(tok.pad_token_id)
    ds = ExampleDataset(examples)
    device = default_device()
    for s in progress(range(0, len(examples), batch_size), desc="scoring"):
        batch = collate([ds[k] for k in range(s, min(s + batch_size, len(examples)))])
        trainer.score_batch({k: v.to(device) for k, v in batch.items()})
    return list(trainer.records.values())
