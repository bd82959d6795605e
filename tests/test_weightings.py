"""Token weightings (DFT, EAFT): values and gradients of the chunked path against plain
full-logit references, composition with selection through the trainer against a per-token
loop, and what a weighted run records and logs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from sstoken import scoring
from sstoken.args import SelectionArguments
from sstoken.weightings import WEIGHTINGS, get_weighting


def reference_weighted(h, W, targets, weighting, n, min_weight=0.0, alpha=1.0, k=20):
    """Full logits, F.cross_entropy, and the weight written out from the papers' formulas."""
    logits = (h @ W.T).to(torch.float64 if h.dtype == torch.float64 else torch.float32)   # (N, V)
    nll = F.cross_entropy(logits, targets, reduction="none")                               # (N,)
    with torch.no_grad():
        if weighting == "dft":
            w = torch.softmax(logits, -1).gather(1, targets[:, None]).squeeze(1).clamp(min=min_weight)
        elif weighting == "eaft":
            top = torch.topk(logits, k, dim=-1).values
            p = torch.softmax(top, -1)
            w = (-(p * torch.log(p)).sum(-1) / 3.0) ** alpha
        else:
            w = torch.ones_like(nll)
    return (w * nll).sum() / n, nll, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("weighting", ["dft", "eaft"])
def test_chunked_weighted_loss_and_gradients_match_full_logits(dtype, chunk, weighting):
    g = torch.Generator().manual_seed(3)
    N, H, V = 23, 16, 97
    h = torch.randn(N, H, generator=g, dtype=dtype)
    W = torch.randn(V, H, generator=g, dtype=dtype) * 0.7
    targets = torch.randint(0, V, (N,), generator=g)
    kw = {"min_weight": 0.05} if weighting == "dft" else {"alpha": 0.7, "k": 9}
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    want, nll_ref, w_ref = reference_weighted(h1, W1, targets, weighting, 17.0, **kw)
    want.backward()
    # the fast path: one "sequence" per row, every position a response token
    h2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    hidden = torch.cat([h2, torch.zeros(1, H, dtype=dtype)])[None]          # (1, N+1, H)
    ids = torch.cat([torch.zeros(1, dtype=torch.long), targets])[None]     # (1, N+1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    topk = kw.get("k", 0) if weighting == "eaft" else 0
    loss, entropy = scoring.response_token_stats(hidden, W2, ids, mask, chunk, topk)
    if weighting == "dft":
        w = scoring.dft_weight(loss, kw["min_weight"])
    else:
        w = scoring.eaft_weight(entropy, kw["alpha"])
    got = scoring.selected_loss(loss, w * mask, 17.0)
    got.backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(loss[0, 1:], nll_ref.detach(), atol=tol, rtol=0)
    assert torch.allclose(w[0, 1:], w_ref, atol=tol * 10, rtol=0)
    assert abs(float(got) - float(want)) < tol * 10
    assert torch.allclose(h2.grad, h1.grad, atol=tol * 10, rtol=0)
    assert torch.allclose(W2.grad, W1.grad, atol=tol * 10, rtol=0)
    assert not w.requires_grad                                # a weight carries no gradient


def test_full_logit_path_gives_the_same_entropy(tiny_dir):
    from sstoken.modeling import forward_token_stats, load_model

    model = load_model(tiny_dir, "float32")
    ids = torch.randint(5, 250, (2, 13))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 9:] = False
    with torch.no_grad():
        s0 = forward_token_stats(model, ids, torch.ones_like(ids), mask, 0, topk=7)
        s1 = forward_token_stats(model, ids, torch.ones_like(ids), mask, 3, topk=7)
    l0, e0, l1, e1 = s0.loss, s0.entropy, s1.loss, s1.entropy
    assert torch.allclose(l0, l1, atol=2e-5) and torch.allclose(e0, e1, atol=2e-5)
    assert (e1[mask & (torch.arange(13) > 0)] > 0).all() and (e1[~mask] == 0).all()
    assert float(e1.max()) <= math.log(7) + 1e-5
    from sstoken.modeling import decoder_hidden, lm_head_weight

    other = load_model(tiny_dir, "float32")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ref = (decoder_hidden(other, ids, torch.ones_like(ids)), lm_head_weight(other))
        k0 = forward_token_stats(model, ids, torch.ones_like(ids), mask, 0, reference=ref).kl
        k1 = forward_token_stats(model, ids, torch.ones_like(ids), mask, 3, reference=ref).kl
    assert torch.allclose(k0, k1, atol=2e-5) and float(k1.max()) > 1e-4 and (k1[~mask] == 0).all()


def test_registry_and_checks():
    from sstoken.errors import UsageError

    assert list(WEIGHTINGS) == ["none", "dft", "eaft", "asft"]
    with pytest.raises(UsageError) as e:
        SelectionArguments(weighting="focal", dft_min_weight=2, eaft_k=1)
    assert "--weighting must be one of none, dft, eaft, asft" in str(e.value)
    with pytest.raises(UsageError, match="asft_alpha"):
        SelectionArguments(weighting="asft", asft_alpha=0)
    with pytest.raises(UsageError, match="dft_min_weight"):
        SelectionArguments(weighting="dft", dft_min_weight=2)
    with pytest.raises(UsageError, match="eaft_k"):
        SelectionArguments(weighting="eaft", eaft_k=1)
    keep = torch.tensor([[False, True, True]])
    w = get_weighting(SelectionArguments(weighting="none")).weights(torch.rand(1, 3), None, keep)
    assert w.tolist() == [[0.0, 1.0, 1.0]]


@pytest.mark.parametrize("method, weighting", [("sstoken", "dft"), ("rho1", "eaft"), ("full", "dft")])
def test_selection_and_weighting_compose_in_the_trainer(tok, method, weighting):
    """The trainer's loss = sum over kept tokens of w * NLL / kept, against a per-token loop
    with eager attention and full logits (the selection part is pinned in test_trainer.py)."""
    from test_trainer import make_batch, ref_cur_and_attn, run_trainer_step, trainer_for

    from sstoken.testing import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(300, layers=2)
    ex = make_batch(tok)
    cur, _ = ref_cur_and_attn(model.state_dict(), ex)
    g = torch.Generator().manual_seed(2)
    for e, c in zip(ex, cur):
        e.extra["history_loss"] = [x + float(torch.randn(1, generator=g)) for x in c]
        e.extra["ref_loss"] = [x + float(torch.randn(1, generator=g)) for x in c]
    sel = SelectionArguments(method=method, weighting=weighting, ref_model="x", save_scores=0, eaft_k=5)
    loss, keep, rec = run_trainer_step(trainer_for(model, tok, ex, sel), tok, ex)
    # the reference: the same kept positions, the weight from the loop's own logits
    m = tiny_llama(300, layers=2, attn_implementation="eager")
    m.load_state_dict(model.state_dict())
    total, n = 0.0, 0
    with torch.no_grad():
        for b, e in enumerate(ex):
            lp = torch.log_softmax(m(input_ids=torch.tensor([e.input_ids])).logits[0].double(), -1)
            for i in sorted(keep[b]):
                nll = -float(lp[i - 1, e.input_ids[i]])
                if weighting == "dft":
                    w = math.exp(-nll)
                else:
                    top = torch.topk(lp[i - 1], 5).values
                    p = torch.softmax(top, -1)
                    w = float(-(p * p.log()).sum()) / 3.0
                total += w * nll
                n += 1
    assert abs(loss - total / n) < 2e-5
    w = rec["weight"]                                          # recorded, and zero off the kept tokens
    assert {(b, i) for b, i in (w > 0).nonzero().tolist()} <= {(b, i) for b, ks in enumerate(keep) for i in ks}


def test_weighted_run_records_weights_and_logs_plain_nll(tmp_path, tiny_dir, records):
    from sstoken.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(6)))
    out = tmp_path / "o"
    assert main(["train", "--model", tiny_dir, "--data", str(data), "--method", "sstoken",
                 "--weighting", "dft", "--dft_min_weight", "0.01", "--lora_r", "4", "--max_steps", "2",
                 "--per_device_train_batch_size", "3", "--use_cpu", "true", "--save_scores", "6",
                 "--output_dir", str(out)]) == 0
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    for h in logs:
        assert 0.01 - 1e-6 <= h["sel/weight_mean"] <= 1 and h["sel/nll_kept"] > h["loss"]   # DFT shrinks the loss
    recs = [json.loads(line) for line in (out / "selection.jsonl").read_text().splitlines()]
    for r in recs:
        kept_w = [w for w, k in zip(r["weight"], r["keep"]) if k]
        assert kept_w and all(0.01 - 1e-6 <= w <= 1 for w in kept_w)           # the floor, in float32
        assert all(w == 0 for w, k, resp in zip(r["weight"], r["keep"], r["response"]) if resp and not k)
    summary = json.loads((out / "sstoken_run.json").read_text())
    assert summary["config"]["weighting"] == "dft"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_chunked_kl_and_gradients_match_full_logits(dtype, chunk):
    """ASFT's anchor: KL(q || p) per token, q the reference's softmax, as F.kl_div computes it
    from full logits (the reference implementation), values and gradients."""
    g = torch.Generator().manual_seed(7)
    B, L, H, V = 2, 9, 12, 61
    hidden = torch.randn(B, L, H, generator=g, dtype=dtype)
    ref_hidden = hidden + 0.3 * torch.randn(B, L, H, generator=g, dtype=dtype)
    W = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    W_ref = W + 0.1 * torch.randn(V, H, generator=g, dtype=dtype)
    mask = torch.rand(B, L, generator=g) > 0.3
    weights = torch.rand(B, L, generator=g, dtype=dtype)
    h1, W1 = hidden.clone().requires_grad_(), W.clone().requires_grad_()
    zp = h1[:, :-1] @ W1.T
    zq = ref_hidden[:, :-1] @ W_ref.T
    kl_ref = torch.zeros(B, L, dtype=dtype)
    kl_ref[:, 1:] = F.kl_div(torch.log_softmax(zp, -1), torch.softmax(zq, -1), reduction="none").sum(-1)
    m = mask.clone()
    m[:, 0] = False
    kl_ref = torch.where(m, kl_ref, 0.0)
    (kl_ref * weights).sum().backward()
    h2, W2 = hidden.clone().requires_grad_(), W.clone().requires_grad_()
    kl = scoring.response_token_kl(h2, W2, ref_hidden, W_ref, mask, chunk)
    (kl * weights).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    assert torch.allclose(kl, kl_ref.detach(), atol=tol, rtol=0) and (kl[m] > 0).all()
    assert torch.allclose(h2.grad, h1.grad, atol=tol, rtol=0)
    assert torch.allclose(W2.grad, W1.grad, atol=tol, rtol=0)
    same = scoring.response_token_kl(hidden, W, hidden, W, mask, chunk)
    assert same.abs().max() < tol                                  # KL(p || p) = 0


def test_asft_in_the_trainer_against_a_loop(tok):
    """Full fine-tuning: the reference is the model as it was when the trainer was built (a
    frozen copy); after the weights move, loss = sum over kept of
    (sg(p) * NLL + alpha * KL(q || p)) / kept, checked with full logits in a loop."""
    from test_trainer import make_batch, run_trainer_step, trainer_for

    from sstoken.testing import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(300, layers=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ex = make_batch(tok)
    sel = SelectionArguments(method="random", weighting="asft", asft_alpha=0.3, save_scores=0)
    trainer = trainer_for(model, tok, ex, sel)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, keep, _ = run_trainer_step(trainer, tok, ex)
    policy = tiny_llama(300, layers=2, attn_implementation="eager")
    policy.load_state_dict(model.state_dict())
    ref = tiny_llama(300, layers=2, attn_implementation="eager")
    ref.load_state_dict(base)
    total, n = 0.0, 0
    with torch.no_grad():
        for b, e in enumerate(ex):
            ids = torch.tensor([e.input_ids])
            lp = torch.log_softmax(policy(input_ids=ids).logits[0].double(), -1)
            lq = torch.log_softmax(ref(input_ids=ids).logits[0].double(), -1)
            for i in sorted(keep[b]):
                nll = -float(lp[i - 1, e.input_ids[i]])
                kl = float((lq[i - 1].exp() * (lq[i - 1] - lp[i - 1])).sum())
                total += math.exp(-nll) * nll + 0.3 * kl
                n += 1
    assert abs(loss - total / n) < 2e-5


@pytest.mark.parametrize("weighting", ["none", "dft"])
def test_weights_from_the_data_multiply_the_loss(tok, weighting):
    """Message weights and spans become per-token weights: loss = sum over kept tokens of
    w_data * w_weighting * NLL / kept tokens (a weight-0 turn is context, not trained)."""
    from test_trainer import ref_cur_and_attn, run_trainer_step, trainer_for

    from sstoken.data import build_examples
    from sstoken.testing import tiny_llama

    recs = [{"messages": [{"role": "user", "content": "the sea"},
                          {"role": "assistant", "content": "is wide and blue", "weight": 0},
                          {"role": "user", "content": "and the dog"},
                          {"role": "assistant", "content": "jumps over the lazy fox",
                           "spans": [{"start": 0, "end": 5, "weight": 0.5}]}]},
            {"prompt": "what is the answer", "completion": "the answer is 5"}]
    ex, _ = build_examples(((f"r{k}", r) for k, r in enumerate(recs)), tok)
    dw = [e.extra["data_weight"] for e in ex]
    assert 0.5 in dw[0] and set(dw[1]) <= {0.0, 1.0}
    torch.manual_seed(0)
    model = tiny_llama(300, layers=2)
    cur, _ = ref_cur_and_attn(model.state_dict(), ex)
    sel = SelectionArguments(method="full", weighting=weighting, save_scores=0)
    loss, keep, _ = run_trainer_step(trainer_for(model, tok, ex, sel), tok, ex)
    total, n = 0.0, 0
    for b, e in enumerate(ex):
        assert keep[b] == {i for i in range(1, len(e.labels)) if e.labels[i] != -100}
        for i in keep[b]:
            w = dw[b][i] * (math.exp(-cur[b][i]) if weighting == "dft" else 1.0)
            total += w * cur[b][i]
            n += 1
    assert abs(loss - total / n) < 2e-5
