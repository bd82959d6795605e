"""Load models and tokenizers, add LoRA, and compute per-token losses of a forward.

The per-token loss path runs the model's normal forward (through DDP/accelerate wrappers) with
``logits_to_keep=1`` so the full-vocabulary logits are never built, catches the decoder's
final hidden states with a forward hook, and projects only the rows that predict a response
token, in chunks (:func:`sstoken.scoring.response_token_losses`). ``loss_chunk_size=0`` selects
the plain path (full logits), the reference the fast path is tested against, and the one to
use with FSDP/DeepSpeed-3 where the lm_head weight is sharded outside the forward.
"""

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


def lm_head_weight(model) -> torch.Tensor:
    """The output projection (V, H) of a plain linear LM head, refused (with what to do) when
    the chunked loss would be wrong: a LoRA adapter on the head (the projection would skip it),
    a sharded head (ZeRO-3, FSDP: the weight is not whole outside the engine's forward), a
    bias or logit soft-capping."""
    from .errors import UsageError

    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise UsageError("a LoRA adapter on lm_head: the chunked loss projects with the head's "
                         "base weight; leave lm_head out of the LoRA targets or use --loss_chunk_size 0")
    if getattr(head, "bias", None) is not None or getattr(lm.config, "final_logit_softcapping", None):
        raise UsageError("the chunked loss supports plain linear lm heads; use --loss_chunk_size 0")
    weight = head.weight
    if weight.numel() == 0 or type(weight).__name__ == "DTensor":
        raise UsageError("the lm_head weight is sharded (ZeRO-3 or FSDP): the chunked loss needs "
                         "it whole; use --loss_chunk_size 0")
    return weight


def forward_token_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        mask: torch.Tensor, chunk_size: int = 1024, topk: int = 0,
                        reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> TokenStats:
    """One forward: per-token NLL on R and, with ``topk`` > 0, each token's top-k entropy
    (EAFT), and with ``reference = (its hidden states (B, L, H), its head weight (V, H))`` the
    per-token ``KL(reference || model)`` (ASFT), all from the same logits, chunk by chunk.
    ``chunk_size=0``: the reference path with full logits."""
    if chunk_size <= 0:
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
            ref_logits = (reference[0][:, :-1] @ reference[1].T).to(acc).detach()
            kl = torch.zeros_like(loss)
            kl[:, 1:] = torch.nn.functional.kl_div(torch.log_softmax(logits[:, :-1].to(acc), -1),
                                                   torch.softmax(ref_logits, -1), reduction="none").sum(-1)
            kl = torch.where(mask, kl, 0.0)
        return TokenStats(loss, entropy, kl)
    weight = lm_head_weight(model)
    hidden = decoder_hidden(model, input_ids, attention_mask)
    loss, entropy = response_token_stats(hidden, weight, input_ids, mask, chunk_size, topk)
    kl = None
    if reference is not None:
        kl = response_token_kl(hidden, weight, reference[0], reference[1], mask, chunk_size)
    return TokenStats(loss, entropy, kl)


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
