"""Capture the response-to-prompt attention mass at one layer inside the normal forward.

Never asks the model for ``output_attentions`` (that forces eager attention in every layer).
Instead a wrapper is registered with transformers' ``AttentionInterface`` under the name
``sstoken_<base>``; it receives q and k already normed and rotated, computes
:func:`sstoken.scoring.attn_prompt_mass` (no grad) on the chosen layer only, and hands every
call to the real kernel (``sdpa``, ``flash_attention_2``, ``eager``...). The base kernel's
mask function is registered under the same name, so padding keeps working.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .scoring import attn_prompt_mass

LAYER_NAMES = ("shallow", "middle", "deep")


def resolve_layer(attn_layer: int | str, num_layers: int) -> int:
    """``attn_layer`` as a non-negative index. Negative counts from the end (-1 = last, the
    official code's choice). Names: ``shallow`` = layer round(0.25 (n-1)), ``middle`` =
    round(0.5 (n-1)), ``deep`` = the last layer."""
    if isinstance(attn_layer, str):
        if attn_layer in LAYER_NAMES:
            frac = {"shallow": 0.25, "middle": 0.5, "deep": 1.0}[attn_layer]
            return int(round(frac * (num_layers - 1)))
        try:
            attn_layer = int(attn_layer)
        except ValueError:
            raise ValueError(f"attn_layer must be an integer or one of {LAYER_NAMES}, got {attn_layer!r}")
    idx = attn_layer + num_layers if attn_layer < 0 else attn_layer
    if not 0 <= idx < num_layers:
        raise ValueError(f"attn_layer {attn_layer} is out of range for a model with {num_layers} layers")
    return idx


@dataclass
class AttnScoreHook:
    """State shared between the trainer and the attention wrapper of one layer.

    ``prompt_mask`` (B, L) bool is set before a forward (None = do nothing), with the sink keys
    ``sink_mask`` (B, L) bool or None (``--attn_sink``); after it, ``attn_score`` (B, L) holds
    the prompt mass of every query position.
    """

    layer_idx: int
    base_impl: str
    prompt_mask: torch.Tensor | None = None
    sink_mask: torch.Tensor | None = None
    attn_score: torch.Tensor | None = None

    def arm(self, prompt_mask: torch.Tensor, sink_mask: torch.Tensor | None = None) -> None:
        self.prompt_mask, self.sink_mask, self.attn_score = prompt_mask, sink_mask, None

    def take(self) -> torch.Tensor:
        score, self.prompt_mask, self.sink_mask, self.attn_score = self.attn_score, None, None, None
        if score is None:
            raise RuntimeError(f"no attention score was captured at layer {self.layer_idx}: "
                               "is the model's attention routed through sstoken's wrapper?")
        return score


def _wrapper(base_impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        hook: AttnScoreHook | None = getattr(module, "_sstoken_hook", None)
        if hook is not None and hook.prompt_mask is not None:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            with torch.no_grad():
                hook.attn_score = attn_prompt_mass(query.detach(), key.detach(), hook.prompt_mask,
                                                   attention_mask, scaling, hook.sink_mask)
        if base_impl == "eager":
            from transformers.models.llama.modeling_llama import eager_attention_forward

            return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[base_impl](module, query, key, value, attention_mask, **kwargs)

    return attention


def register(base_impl: str) -> str:
    """Register ``sstoken_<base_impl>`` (attention and mask function); return the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"sstoken_{base_impl}"
    AttentionInterface.register(name, _wrapper(base_impl))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_impl])
    return name


def _attention_modules(model) -> list[torch.nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if not mods:
        mods = [m for m in model.modules() if hasattr(m, "layer_idx") and "Attention" in type(m).__name__]
    return mods


def install(model, attn_layer: int | str = -1) -> AttnScoreHook:
    """Route ``model``'s attention through the wrapper and hook layer ``attn_layer``.

    Works on a plain ``PreTrainedModel`` or a peft model. The model's current implementation
    (``sdpa`` by default) stays the kernel that computes the outputs.
    """
    base = getattr(model, "get_base_model", lambda: model)()
    impl = base.config._attn_implementation or "sdpa"
    if impl.startswith("sstoken_"):
        impl = impl[len("sstoken_"):]
    mods = _attention_modules(base)
    layer = resolve_layer(attn_layer, base.config.num_hidden_layers)
    targets = [m for m in mods if m.layer_idx == layer]
    if not targets:
        raise ValueError(f"found no attention module with layer_idx {layer}")
    for m in mods:
        if hasattr(m, "_sstoken_hook"):
            del m._sstoken_hook
    hook = AttnScoreHook(layer, impl)
    for m in targets:
        m._sstoken_hook = hook
    base.set_attn_implementation(register(impl))
    return hook


def uninstall(model) -> None:
    """Undo :func:`install`: remove the hooks and give the model back its own kernel."""
    base = getattr(model, "get_base_model", lambda: model)()
    for m in _attention_modules(base):
        if hasattr(m, "_sstoken_hook"):
            del m._sstoken_hook
    impl = base.config._attn_implementation or "sdpa"
    if impl.startswith("sstoken_"):
        base.set_attn_implementation(impl[len("sstoken_"):])


@contextlib.contextmanager
def installed(model, attn_layer: int | str = -1) -> Iterator[AttnScoreHook]:
    """``with installed(model, layer) as hook:`` - :func:`install` for the block, then undone."""
    hook = install(model, attn_layer)
    try:
        yield hook
    finally:
        uninstall(model)
