"""Load models and tokenizers, add LoRA, and compute per-token losses of a forward.

The per-token loss path runs the model's normal forward (through DDP, FSDP, DeepSpeed and
accelerate wrappers), but the LM head's call projects only the rows that predict a response
token, in chunks (:func:`sstoken.scoring.response_token_stats`), so the full-vocabulary logits
are never built. Because that happens inside the head's own call, a sharded engine gathers the
head weight there once, as it would for logits (:func:`head_computes`). ``loss_chunk_size=0``
selects the plain path (full logits), the reference the fast path is tested against."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .embedded import resolve_model
from .scoring import (response_token_kl, response_token_stats, token_losses_from_logits,
                      topk_entropy_from_logits)


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str, dtype: str = "auto", attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=pick_dtype(dtype),
                                                attn_implementation=attn_implementation)


@contextlib.contextmanager
def whole_model_loading():
    """Within the block, ``from_pretrained`` loads an ordinary whole model even when a ZeRO-3
    run is configured in this process. (transformers partitions every model it loads while a
    ZeRO-3 ``TrainingArguments`` exists, with collective calls; a model that one rank loads
    alone, such as the scoring model of the loss cache, would wait for the others forever.)"""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_ds.set_hf_deepspeed_config(config)


def load_model_with_adapter(model: str, adapter: str | None, dtype: str = "auto",
                            attn_implementation: str = "sdpa"):
    """A base model, optionally with a LoRA adapter merged in (for scoring and evaluation)."""
    m = load_model(model, dtype, attn_implementation)
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
    return m


def add_lora(model, r: int, alpha: int, dropout: float, targets: str):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                     target_modules=[t.strip() for t in targets.split(",") if t.strip()])
    return get_peft_model(model, cfg)


def unwrap(model):
    """Strip DDP/accelerate wrappers (not peft)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def causal_lm(model):
    """The ``*ForCausalLM`` inside DDP and peft wrappers."""
    m = unwrap(model)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def is_peft(model) -> bool:
    return hasattr(unwrap(model), "disable_adapter")


def forward_token_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         mask: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token NLL ``(B, L)`` float32 on R (zero elsewhere) of one forward of ``model``.

    Gradients flow when grad is enabled. ``chunk_size=0``: the reference path with full logits.
    """
    return forward_token_stats(model, input_ids, attention_mask, mask, chunk_size).loss


@dataclass
class TokenStats:
    """What one forward gives per token, all (B, L) and zero off R: the NLL (with grad when
    grad is on), the top-k entropy (EAFT, no grad) and the KL to a reference (ASFT, with grad)."""

    loss: torch.Tensor
    entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None


def decoder_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states (B, L, H) of one forward, without building logits."""
    lm = causal_lm(model)
    captured = {}

    def grab(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = lm.get_decoder().register_forward_hook(grab)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured["h"]


def lm_head(model) -> torch.nn.Module:
    """The output projection module, refused (with what to do) where the chunked loss would be
    wrong: a LoRA adapter on the head (the projection would skip it), a bias or logit
    soft-capping."""
    from .errors import UsageError

    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise UsageError("a LoRA adapter on lm_head: the chunked loss projects with the head's "
                         "base weight; leave lm_head out of the LoRA targets or use --loss_chunk_size 0")
    if getattr(head, "bias", None) is not None or getattr(lm.config, "final_logit_softcapping", None):
        raise UsageError("the chunked loss supports plain linear lm heads; use --loss_chunk_size 0")
    return head


def checked_whole(weight: torch.Tensor) -> torch.Tensor:
    """The head weight, checked to be whole here. Inside the head's call FSDP2 and ZeRO-3 have
    gathered it (tests/test_engines.py); outside, a shard or an empty ZeRO-3 partition is an
    error, never silently projected with."""
    if type(weight).__name__ == "DTensor" or weight.numel() == 0:
        raise RuntimeError("the lm_head weight is sharded here (FSDP or ZeRO-3): read it inside "
                           "the head's call (modeling.head_computes)")
    return weight


def lm_head_weight(model) -> torch.Tensor:
    """The output projection weight (V, H), whole. Outside the head's own call a sharded engine
    may hold it partitioned; :func:`head_computes` runs inside that call instead."""
    return checked_whole(lm_head(model).weight)


@contextlib.contextmanager
def head_computes(model, fn):
    """Within the block, a call of the model's LM head returns ``fn(hidden (B, L, H), weight
    (V, H))`` instead of logits.

    Why: a sharded engine (ZeRO-3, FSDP2 with its own head group) holds the head weight whole
    only inside the head module's call (its hooks gather it before and free it after, and
    gather it again for the backward of whatever that call returned). Running the chunked
    projection there gathers the head once per forward, never once per chunk, and the
    engine's own hooks route the gradient. Without an engine it is an ordinary call."""
    head = lm_head(model)
    saved = head.__dict__.get("forward")

    def forward(hidden):
        return fn(hidden, checked_whole(head.weight))

    head.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def forward_token_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        mask: torch.Tensor, chunk_size: int = 1024, topk: int = 0,
                        reference: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> TokenStats:
    """One forward: per-token NLL on R and, with ``topk`` > 0, each token's top-k entropy
    (EAFT), and with ``reference = (its hidden states (B, L, H), its head weight (V, H) or
    None for this model's own head)`` the per-token ``KL(reference || model)`` (ASFT), all
    from the same logits, chunk by chunk. ``chunk_size=0``: the reference path with full
    logits.

    The chunked path runs inside the model's own forward: the decoder's hidden states reach
    the head as usual (``logits_to_keep=0``: every position), and the head's call computes
    the chunked statistics (:func:`head_computes`) instead of (B, L, V) logits."""
    if chunk_size <= 0:
        ref_logits = None
        if reference is not None and reference[1] is None:     # the reference uses this head:
            def both(hidden, weight):                          # its logits and the reference's
                return hidden @ weight.T, (reference[0] @ weight.T).detach()

            with head_computes(model, both):
                logits, ref_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits   # (B, L, V)
        loss = torch.where(mask, token_losses_from_logits(logits, input_ids), 0.0)
        B, L, V = logits.shape
        acc = loss.dtype
        entropy = kl = None
        if topk > 0:
            entropy = torch.zeros_like(loss)
            entropy[:, 1:] = topk_entropy_from_logits(logits[:, :-1].to(acc).reshape(-1, V), topk).view(B, L - 1)
            entropy = torch.where(mask, entropy, 0.0)
        if reference is not None:
            if ref_logits is None:
                ref_logits = reference[0] @ reference[1].T                      # (B, L, V)
            ref_logits = ref_logits[:, :-1].to(acc).detach()
            kl = torch.zeros_like(loss)
            kl[:, 1:] = torch.nn.functional.kl_div(torch.log_softmax(logits[:, :-1].to(acc), -1),
                                                   torch.softmax(ref_logits, -1), reduction="none").sum(-1)
            kl = torch.where(mask, kl, 0.0)
        return TokenStats(loss, entropy, kl)

    def stats(hidden, weight):                       # inside the head's call: weight is whole
        loss, entropy = response_token_stats(hidden, weight, input_ids, mask, chunk_size, topk)
        kl = None
        if reference is not None:
            ref_w = reference[1] if reference[1] is not None else weight.detach()
            kl = response_token_kl(hidden, weight, reference[0], ref_w, mask, chunk_size)
        return loss, entropy, kl

    with head_computes(model, stats):
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=0,
                    use_cache=False).logits
    return TokenStats(*out)


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model, for LoRA: the same network with the adapter switched off."""
    with unwrap(model).disable_adapter():
        yield


def merge_and_save(base: str, adapter: str, out_dir: str, dtype: str = "float32") -> str:
    """Merge a LoRA adapter into its base and save a plain model with the tokenizer."""
    from peft import PeftModel

    m = load_model(base, dtype)
    merged = PeftModel.from_pretrained(m, adapter).merge_and_unload()
    merged.save_pretrained(out_dir)
    load_tokenizer(base).save_pretrained(out_dir)
    return out_dir
