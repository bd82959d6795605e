"""Checks that need a CUDA device (deselected by default; run with ``pytest -m gpu``)."""
import pytest
import torch

from sstoken import attention, scoring
from sstoken.testing import tiny_llama

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA device (run them with -m gpu on a GPU machine)")


@pytest.mark.parametrize("impl", ["sdpa", "flash_attention_2"])
def test_attention_hook_on_cuda_bf16_against_fp32_eager(impl):
    if impl == "flash_attention_2":
        pytest.importorskip("flash_attn")
    ref = tiny_llama(300, layers=2, heads=8, kv_heads=2, hidden=128, attn_implementation="eager").cuda()
    m = tiny_llama(300, layers=2, heads=8, kv_heads=2, hidden=128, attn_implementation=impl,
                   dtype=torch.bfloat16).cuda()
    m.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    B, L = 3, 256
    ids = torch.randint(5, 300, (B, L), device="cuda")
    am = torch.ones(B, L, dtype=torch.long, device="cuda")
    am[1, 200:] = 0
    resp = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    resp[:, 64:] = True
    resp &= am.bool()
    prompt = am.bool() & ~resp
    with torch.no_grad():
        want = scoring.attn_prompt_mass_from_probs(
            ref(input_ids=ids, attention_mask=am, output_attentions=True).attentions[-1], prompt)
        hook = attention.install(m, -1)
        hook.arm(prompt)
        m(input_ids=ids, attention_mask=am)
        got = hook.take()
    assert (got - want)[resp].abs().max() < 2e-2          # bf16 against fp32


def test_chunked_loss_on_cuda_matches_full_logits():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4, 512, 256, device="cuda", generator=g, requires_grad=True)
    W = torch.randn(32000, 256, device="cuda", generator=g, requires_grad=True)
    ids = torch.randint(0, 32000, (4, 512), device="cuda", generator=g)
    mask = torch.rand(4, 512, device="cuda", generator=g) > 0.3
    keep = torch.rand(4, 512, device="cuda", generator=g) > 0.4            # 40% dropped by selection
    w = torch.randn(4, 512, device="cuda", generator=g) * keep             # any sign, 0 when dropped
    fast = scoring.response_token_losses(h, W, ids, mask, chunk_size=256)   # several chunks
    (fast * w).sum().backward()
    gh, gw = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    ref = torch.where(mask, scoring.token_losses_from_logits(h @ W.T, ids), 0.0)
    mask[:, 0] = False
    ref = torch.where(mask, ref, 0.0)
    (ref * w).sum().backward()
    assert (fast - ref).abs().max() < 1e-3
    assert (gh - h.grad).abs().max() < 1e-3 and (gw - W.grad).abs().max() < 1e-3
