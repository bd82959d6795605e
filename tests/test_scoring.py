"""Fast paths of sstoken.scoring against slow, obviously-correct references."""
import math
from fractions import Fraction

import pytest
import torch

from sstoken import scoring as S


def ref_ceil(rho, n):
    return math.ceil(Fraction(str(rho)) * n)


def loop_top_per_sample(score, mask, rho):
    """Reference Eq. 11: per sample, sort response positions by (-score, position)."""
    keep = torch.zeros_like(mask)
    for b in range(score.shape[0]):
        pos = [i for i in range(score.shape[1]) if mask[b, i]]
        pos.sort(key=lambda i: (-float(score[b, i]), i))
        for i in pos[:ref_ceil(rho, len(pos))]:
            keep[b, i] = True
    return keep


def random_mask(B, L, g):
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(1, L, (1,), generator=g))
        s = int(torch.randint(1, L - n + 1, (1,), generator=g))
        mask[b, s:s + n] = True
    mask[0] = False
    mask[0, L - 1] = True                     # a sample with exactly one response token
    return mask


def test_num_keep_is_exact():
    for rho in (0.2, 0.6, 0.7, 1.0, 0.35):
        for n in range(0, 60):
            assert S.num_keep(n, rho) == ref_ceil(rho, n)
            assert int(S.num_keep(torch.tensor([n]), rho)) == ref_ceil(rho, n)


@pytest.mark.parametrize("rho", [0.2, 0.6, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_select_top_per_sample_matches_loop(rho, ties):
    g = torch.Generator().manual_seed(1)
    B, L = 6, 17
    score = torch.rand(B, L, generator=g)
    if ties:
        score = (score * 3).floor()           # many equal scores
    mask = random_mask(B, L, g)
    keep = S.select_top_per_sample(score, mask, rho)
    assert torch.equal(keep, loop_top_per_sample(score, mask, rho))
    assert not (keep & ~mask).any()


@pytest.mark.parametrize("k", [0, 1, 7, 40])
def test_select_top_flat_matches_loop(k):
    g = torch.Generator().manual_seed(2)
    score = (torch.rand(4, 9, generator=g) * 4).floor()
    mask = random_mask(4, 9, g)
    keep = S.select_top_flat(score, mask, k)
    items = [(-float(score[b, i]), b, i) for b in range(4) for i in range(9) if mask[b, i]]
    ref = torch.zeros_like(mask)
    for _, b, i in sorted(items)[:k]:
        ref[b, i] = True
    assert torch.equal(keep, ref)


def test_minmax_normalize_matches_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 11, generator=g)
    mask = random_mask(5, 11, g)
    x[1][mask[1]] = 0.7                        # a constant sample maps to 0
    out = S.minmax_normalize(x, mask)
    for b in range(5):
        vals = [float(x[b, i]) for i in range(11) if mask[b, i]]
        lo, hi = min(vals), max(vals)
        for i in range(11):
            want = 0.0 if not mask[b, i] or hi == lo else (float(x[b, i]) - lo) / (hi - lo)
            assert abs(float(out[b, i]) - want) < 1e-6


def test_percentile_normalize_matches_loop():
    """--normalize rank: (average rank - 1) / (n - 1) per sample, ties sharing their rank."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, 12, generator=g)
    mask = random_mask(6, 12, g)
    x[1][mask[1]] = 0.7                        # all equal: every token at 0.5
    x[2, ::3] = 0.25                           # ties inside a sample
    out = S.percentile_normalize(x, mask)
    for b in range(6):
        vals = [float(x[b, i]) for i in range(12) if mask[b, i]]
        n = len(vals)
        for i in range(12):
            if not mask[b, i]:
                assert out[b, i] == 0
                continue
            v = float(x[b, i])
            less, equal = sum(u < v for u in vals), sum(u == v for u in vals)
            rank = less + (equal + 1) / 2                      # 1-based average rank
            want = 0.5 if n == 1 else (rank - 1) / (n - 1)
            assert abs(float(out[b, i]) - want) < 1e-6, (b, i)


def test_percentile_normalize_keeps_the_order():
    """A monotone map: at gamma 0 or 1 rank and minmax keep the same tokens (ties included)."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(4, 20, generator=g).round(decimals=1)      # many ties
    mask = random_mask(4, 20, g)
    for rho in (0.3, 0.6):
        assert torch.equal(S.select_top_per_sample(S.percentile_normalize(x, mask), mask, rho),
                           S.select_top_per_sample(S.minmax_normalize(x, mask), mask, rho))


def test_sstoken_score_extremes():
    g = torch.Generator().manual_seed(4)
    rel_norm, attn = torch.rand(3, 8, generator=g), torch.rand(3, 8, generator=g)
    mask = torch.ones(3, 8, dtype=torch.bool)
    assert torch.allclose(S.sstoken_score(rel_norm, attn, mask, 1.0), rel_norm)
    assert torch.allclose(S.sstoken_score(rel_norm, attn, mask, 0.0), attn)
    s = S.sstoken_score(rel_norm, attn, mask, 0.3)
    assert torch.allclose(s, 0.3 * rel_norm + 0.7 * attn)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("dropped", [0.0, 0.5, 1.0])
def test_chunked_losses_and_grads_match_full_logits(dtype, tol, chunk, dropped):
    g = torch.Generator().manual_seed(5)
    B, L, H, V = 3, 10, 8, 37
    hidden = torch.randn(B, L, H, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = random_mask(B, L, g)
    w = torch.randn(B, L, generator=g, dtype=torch.float32)     # arbitrary downstream weights, any sign
    w[torch.rand(B, L, generator=g) < dropped] = 0.0             # tokens selection drops

    fast = S.response_token_losses(hidden, W, ids, mask, chunk_size=chunk)
    (fast * w).sum().backward()
    gh_fast, gw_fast = hidden.grad.clone(), W.grad.clone()
    hidden.grad = W.grad = None

    ref = torch.where(mask, S.token_losses_from_logits(hidden @ W.T, ids), 0.0)
    (ref * w).sum().backward()
    assert (fast - ref).abs().max() < tol
    assert (gh_fast - hidden.grad).abs().max() < tol
    assert (gw_fast - W.grad).abs().max() < tol


def test_token_losses_from_logits_is_the_nll_loop():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    out = S.token_losses_from_logits(logits, ids)
    for b in range(2):
        assert out[b, 0] == 0
        for i in range(1, 5):
            p = torch.softmax(logits[b, i - 1].double(), -1)[ids[b, i]]
            assert abs(float(out[b, i]) + math.log(float(p))) < 1e-5


def test_attn_prompt_mass_matches_materialized_probs():
    """Fused SDPA with an indicator value equals summing explicit softmax probabilities,
    with padding (left and right), GQA, and an additive float mask."""
    g = torch.Generator().manual_seed(7)
    B, H, Hkv, L, D = 3, 4, 2, 9, 8
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, 6:] = False                          # right padding
    pad[2, :2] = False                          # left padding
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal[None, None] & pad[:, None, None, :]
    prompt = pad.clone()
    prompt[:, 5:] = False
    scale = D ** -0.5
    # reference: explicit probabilities, loops over heads
    kk = k.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, -1))
    ref = S.attn_prompt_mass_from_probs(probs, prompt)
    for mask_form in (allowed, torch.where(allowed, 0.0, torch.finfo(torch.float32).min), pad.long()):
        fast = S.attn_prompt_mass(q, k, prompt, mask_form, scale)
        valid = pad & pad.cumsum(1).gt(0)
        assert (fast - ref)[valid].abs().max() < 1e-6
    # no mask at all = pure causal
    fast = S.attn_prompt_mass(q[:1], k[:1], prompt[:1], None, scale)
    assert (fast - ref[:1]).abs().max() < 1e-6
    assert ((ref >= -1e-6) & (ref <= 1 + 1e-6)).all()


def test_sink_keys_are_the_first_real_tokens():
    am = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert S.sink_keys(am, 1).tolist() == [[True, False, False, False, False],
                                           [False, False, True, False, False]]
    assert S.sink_keys(am, 2).sum(1).tolist() == [2, 2]


def test_attn_prompt_mass_without_sinks_matches_an_eager_loop():
    """--attn_sink: the fused two-channel SDPA equals, per query and head, the prompt mass
    over non-sink keys divided by the mass over non-sink keys, averaged over heads (a loop
    over explicit softmax rows), with padding on both sides and GQA."""
    g = torch.Generator().manual_seed(17)
    B, H, Hkv, L, D = 3, 4, 2, 10, 8
    q = torch.randn(B, H, L, D, generator=g) * 2
    k = torch.randn(B, Hkv, L, D, generator=g) * 2
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, 7:] = False
    pad[2, :2] = False
    prompt = pad.clone()
    prompt[:, 6:] = False
    scale = D ** -0.5
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    for n_sink in (1, 2):
        sink = S.sink_keys(pad.long(), n_sink)
        fast = S.attn_prompt_mass(q, k, prompt, allowed, scale, sink_mask=sink)
        kk = k.repeat_interleave(H // Hkv, dim=1)
        probs = torch.nan_to_num(torch.softmax(
            ((q @ kk.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf")), -1))
        via_probs = S.attn_prompt_mass_from_probs(probs, prompt, sink)
        for b in range(B):
            for i in range(L):
                if not pad[b, i] or not allowed[b, 0, i].any():
                    continue
                per_head = []
                for h in range(H):
                    row = probs[b, h, i].double()
                    rest = sum(float(row[j]) for j in range(L) if not sink[b, j])
                    on_p = sum(float(row[j]) for j in range(L) if prompt[b, j] and not sink[b, j])
                    per_head.append(on_p / rest if rest > 1e-6 else 0.0)
                want = sum(per_head) / H
                assert abs(float(fast[b, i]) - want) < 1e-6, (n_sink, b, i)
                assert abs(float(via_probs[b, i]) - want) < 1e-6
        # no sink: the old score; the sink mass only raises what is left
        assert torch.allclose(S.attn_prompt_mass(q, k, prompt, allowed, scale),
                              S.attn_prompt_mass_from_probs(probs, prompt), atol=1e-6)


def test_select_random_is_reproducible_and_sized():
    mask = random_mask(4, 12, torch.Generator().manual_seed(8))
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(4)]
    a, b = S.select_random(mask, 0.6, gens()), S.select_random(mask, 0.6, gens())
    assert torch.equal(a, b)
    assert a.sum(1).tolist() == [ref_ceil(0.6, int(n)) for n in mask.sum(1)]
