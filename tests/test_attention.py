"""The attention-score wrapper against the whole model in eager mode with output_attentions."""
import pytest
import torch

from sstoken import attention, scoring
from sstoken.testing import tiny_llama


def eager_reference(model_sd, ids, am, prompt, layer, layers, heads, kv):
    ref = tiny_llama(300, layers=layers, heads=heads, kv_heads=kv, attn_implementation="eager")
    ref.load_state_dict(model_sd)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=am, output_attentions=True)
    return scoring.attn_prompt_mass_from_probs(out.attentions[layer], prompt), out.logits


def batch(seed=0, B=4, L=14, left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    resp = torch.zeros(B, L, dtype=torch.bool)
    lens = [L, L - 3, 6, L - 1]
    for b, n in enumerate(lens[:B]):
        if left:
            am[b, :L - n] = 0
            resp[b, L - n + n // 2:] = True
        else:
            am[b, n:] = 0
            resp[b, n // 2:n] = True
    resp[2] = False
    resp[2, 5 if not left else L - 1] = True           # one response token
    return ids, am, resp


@pytest.mark.parametrize("layer", [-1, 0, "middle"])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hook_matches_eager_output_attentions(layer, left, impl):
    layers, heads, kv = 3, 4, 2                            # GQA: 2 query heads per key head
    m = tiny_llama(300, layers=layers, heads=heads, kv_heads=kv, attn_implementation=impl)
    ids, am, resp = batch(left=left)
    prompt = am.bool() & ~resp
    idx = attention.resolve_layer(layer, layers)
    ref, ref_logits = eager_reference(m.state_dict(), ids, am, prompt, idx, layers, heads, kv)
    hook = attention.install(m, layer)
    assert m.config._attn_implementation == f"sstoken_{impl}"
    with torch.no_grad():
        hook.arm(prompt)
        logits = m(input_ids=ids, attention_mask=am).logits
        got = hook.take()
    assert (got - ref)[resp].abs().max() < 1e-5
    assert (logits - ref_logits)[am.bool()].abs().max() < 1e-5     # outputs unchanged
    assert ((got[resp] > 0) & (got[resp] < 1)).all()                # non-trivial values


def test_hook_through_peft_and_only_when_armed():
    import peft
    m = tiny_llama(300, layers=2)
    ids, am, resp = batch()
    prompt = am.bool() & ~resp
    ref, _ = eager_reference(m.state_dict(), ids, am, prompt, 1, 2, 4, 2)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    hook = attention.install(pm, -1)
    with torch.no_grad():
        pm(input_ids=ids, attention_mask=am)
        assert hook.attn_score is None                           # not armed: nothing computed
        hook.arm(prompt)
        pm(input_ids=ids, attention_mask=am)
    assert (hook.take() - ref)[resp].abs().max() < 1e-5          # B = 0: same as the base
    with pytest.raises(RuntimeError, match="no attention score"):
        hook.take()


def test_resolve_layer():
    assert attention.resolve_layer(-1, 30) == 29
    assert attention.resolve_layer("-2", 30) == 28
    assert attention.resolve_layer("deep", 30) == 29
    assert attention.resolve_layer("middle", 30) == 14
    assert attention.resolve_layer("shallow", 30) == 7
    with pytest.raises(ValueError, match="out of range"):
        attention.resolve_layer(30, 30)
    with pytest.raises(ValueError, match="integer or one of"):
        attention.resolve_layer("top", 30)
