"""sstoken.methods: the interface every method implements, checked for each of them.

Each method's keep mask against its slow reference lives in test_trainer.py (through the
trainer's own code path); here: the registry, the count known before the forward equals the
mask after it, what each method asks for, and the option checks."""
import pytest
import torch

from sstoken.args import SelectionArguments
from sstoken.errors import UsageError
from sstoken.methods import METHODS, Method, Tokens, get_method
from sstoken.records import PER_TOKEN
from sstoken.scoring import response_mask


def batch(seed=0, B=4, L=12):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(5, 50, (B, L), generator=g)
    labels[:, :3] = -100                                   # a prompt
    labels[1, 8:] = -100                                   # right padding
    labels[2, 3:] = -100
    labels[2, 5] = 7                                       # one response token
    resp = response_mask(labels)
    keep = (torch.rand(B, L, generator=g) > 0.5).float()
    t = Tokens(resp=resp, loss=torch.rand(B, L, generator=g) * 3, index=torch.arange(B), seed=1,
               history_loss=torch.rand(B, L, generator=g) * 3, ref_loss=torch.rand(B, L, generator=g) * 3,
               keep=keep, attn_score=torch.rand(B, L, generator=g), step=5, max_steps=10)
    return {"labels": labels, "keep": keep}, t


def args_for(name, **kw):
    extra = {"ref_model": "ref"} if name in ("rho1", "tokencleaning") else {}
    return SelectionArguments(method=name, **extra, **kw)


def test_registry_names_each_class_once():
    assert list(METHODS) == ["full", "random", "rho1", "tokencleaning", "sstoken"]
    assert all(issubclass(c, Method) and c.name == n for n, c in METHODS.items())


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("rho", [0.2, 0.6, 1.0])
def test_num_kept_before_the_forward_equals_the_mask(name, rho):
    for scope in ("sample", "batch") if name in ("rho1", "sstoken") else ("auto",):
        m = get_method(args_for(name, rho=rho, scope=scope))
        b, t = batch()
        sel = m.select(t)
        assert sel.keep.dtype == torch.bool and not (sel.keep & ~t.resp).any()     # a subset of R
        assert int(sel.keep.sum()) == m.num_kept(t.resp, b), (name, scope)
        for k, v in sel.record.items():
            assert v.shape == t.resp.shape, k
        assert set(sel.record) <= set(PER_TOKEN)           # the record schema, declared once


def test_what_each_method_needs():
    assert get_method(args_for("full")).needs(0, 10) == get_method(args_for("rho1")).needs(0, 10)
    s = get_method(args_for("sstoken", gamma=0.5, rel_warmup=0.2))
    assert s.needs(1, 10).attention and not s.needs(1, 10).history       # warm-up: attention only
    assert s.needs(2, 10).attention and s.needs(2, 10).history
    g1 = get_method(args_for("sstoken", gamma=1.0))
    assert g1.needs(0, 10).history and not g1.needs(0, 10).attention
    g0 = get_method(args_for("sstoken", gamma=0.0))
    assert not g0.needs(0, 10).history and g0.needs(0, 10).attention


def test_sstoken_records_its_parts_and_rho1_its_excess_loss():
    _, t = batch()
    sel = get_method(args_for("sstoken", gamma=0.5)).select(t)
    assert set(sel.record) == {"rel", "rel_norm", "attn_score", "score", "by_attention"} and sel.gamma == 0.5
    assert torch.equal(sel.record["rel"], torch.where(t.resp, t.history_loss - t.loss, 0.0))
    r = get_method(args_for("rho1")).select(t)
    assert torch.equal(r.record["score"], torch.where(t.resp, t.loss - t.ref_loss, 0.0))   # current - ref
    assert r.gamma is None


def test_random_depends_on_seed_and_example_not_on_the_batch():
    m = get_method(args_for("random"))
    b, t = batch()
    whole = m.select(t).keep
    for i in range(4):                                    # each example alone gives the same choice
        one = Tokens(resp=t.resp[i:i + 1], loss=t.loss[i:i + 1], index=t.index[i:i + 1], seed=1)
        assert torch.equal(m.select(one).keep[0], whole[i])
    t.seed = 2
    assert not torch.equal(m.select(t).keep, whole)


@pytest.mark.parametrize("kw, msg", [
    ({"method": "rho1"}, "needs --ref_model"),
    ({"method": "tokencleaning"}, "needs --ref_model"),
    ({"method": "rho1", "ref_model": "r", "scope": "pool"}, "not pool"),
    ({"method": "tokencleaning", "ref_model": "r", "scope": "batch"}, "not batch"),
    ({"method": "sstoken", "scope": "pool"}, "not pool"),
])
def test_method_option_checks(kw, msg):
    with pytest.raises(UsageError, match=msg):
        SelectionArguments(**kw)


def test_default_scopes():
    assert SelectionArguments(method="tokencleaning", ref_model="r").scope == "pool"
    assert SelectionArguments(method="sstoken").scope == "sample"
    assert SelectionArguments(method="tokencleaning", tc_mode="self_evolving").scope == "pool"
