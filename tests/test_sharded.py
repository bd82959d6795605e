"""The chunked loss runs inside the LM head's call (``modeling.head_computes``), where a
sharded engine holds the head weight whole. A fake engine here does what ZeRO-3 does to the
head: the weight is an empty tensor outside the call, gathered by a pre-forward hook, freed
by a post-forward hook, gathered again by a backward pre-hook and freed after the backward. Losses and gradients equal
the full-logit reference, and the head is gathered once per forward whatever the chunk size.
(The real engines: tests/test_engines.py, ``-m engines``.)"""
import torch

from sstoken.modeling import forward_token_stats, lm_head
from sstoken.testing import tiny_llama


class FakeZero3:
    """Partition the head weight outside its module's call, as ZeRO-3 does."""

    def __init__(self, head: torch.nn.Module):
        self.head, self.whole = head, head.weight.data.clone()
        self.gathers = 0
        head.weight.data = torch.empty(0)
        head.register_forward_pre_hook(lambda m, a: self.gather())
        head.register_forward_hook(lambda m, a, out: self.free())
        head.register_full_backward_pre_hook(lambda m, g: self.gather())
        head.register_full_backward_hook(lambda m, gi, go: self.free())

    def gather(self):
        self.gathers += 1
        self.head.weight.data = self.whole

    def free(self):
        self.head.weight.data = torch.empty(0)


def batch(vocab, B=3, L=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, -5:] = 0
    resp = torch.zeros(B, L, dtype=torch.bool)
    resp[:, 6:] = True
    resp &= am.bool()
    return ids, am, resp


def grads(model, ids, am, resp, chunk):
    model.zero_grad()
    loss = forward_token_stats(model, ids, am, resp, chunk).loss
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_inside_a_partitioned_heads_call_equals_full_logits():
    reference = tiny_llama(300, layers=2, seed=3)
    sharded = tiny_llama(300, layers=2, seed=3)
    engine = FakeZero3(lm_head(sharded))
    ids, am, resp = batch(300)
    want_loss, want = grads(reference, ids, am, resp, 0)                 # full logits
    got_loss, got = grads(sharded, ids, am, resp, 4)                      # 11+ chunks
    assert engine.gathers == 2                                            # forward + backward
    assert sharded.lm_head.weight.numel() == 0                            # freed again
    assert torch.allclose(got_loss, want_loss, atol=1e-5)
    assert set(got) == set(want)
    for n in want:
        if n == "lm_head.weight":     # .data was swapped, the gradient is the whole head's
            assert got[n].shape == engine.whole.shape
        assert torch.allclose(got[n], want[n], atol=1e-5), n


def test_the_head_is_restored_after_the_block():
    model = tiny_llama(300, layers=2, seed=3)
    ids, am, resp = batch(300)
    forward_token_stats(model, ids, am, resp, 4)
    assert "forward" not in lm_head(model).__dict__                      # the class's own again
    logits = model(input_ids=ids, attention_mask=am).logits
    assert logits.shape == (3, 17, 300)


def test_no_tensor_as_large_as_the_logits_inside_a_partitioned_head():
    """Memory: with the head partitioned outside its call, the chunked path (forward and
    backward) creates no tensor near B x L x V elements; the largest is a layer's activation.
    The full-logit path, measured the same way, does."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    V, B, L = 300, 4, 64
    sizes = {}
    for chunk in (0, 4):
        model = tiny_llama(V, layers=2, seed=3)
        FakeZero3(lm_head(model))
        ids, am, resp = batch(V, B, L)
        with Largest() as seen:
            forward_token_stats(model, ids, am, resp, chunk).loss.sum().backward()
        sizes[chunk] = seen.numel
    assert sizes[0] >= B * L * V                               # the measure sees the logits
    assert sizes[4] < B * L * V / 4              # the largest: an MLP activation (B x L x 64)
