"""SelectionTrainer: loss normalization over the optimizer step, and every method's keep mask
and loss against slow references written as plain per-sample, per-token loops."""
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from sstoken.args import SelectionArguments
from sstoken.data import Collator, ExampleDataset, build_examples
from sstoken.history import TrainableEMA
from sstoken.methods.tokencleaning import pool_keep
from sstoken.scoring import response_mask
from sstoken.testing import free_port, tiny_llama
from sstoken.trainer import SelectionTrainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import ddp_step  # noqa: E402
from conftest import make_records  # noqa: E402


# --------------------------------------------------------------------------- normalization

def manual_sgd_step(model_dir, lr=0.5, naive_micro=None):
    """Reference update for method full: one SGD step on sum(NLL of R) / |R| over all 8
    examples, each example forwarded alone (no padding) with full logits. ``naive_micro=k``
    instead averages per-micro-batch means over micro-batches of k (the classic bug)."""
    from sstoken.modeling import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, "float32")
    recs = make_records(8, seed=3, multi_turn=True)
    ex, _ = build_examples(((f"r{k}", r) for k, r in enumerate(recs)), tok)
    per_ex = []
    for e in ex:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0]
        s, n = 0.0, 0
        for i in range(1, len(e.input_ids)):
            if e.labels[i] != -100:
                s = s - torch.log_softmax(logits[i - 1], -1)[e.input_ids[i]]
                n += 1
        per_ex.append((s, n))
    if naive_micro is None:
        loss = sum(s for s, _ in per_ex) / sum(n for _, n in per_ex)
    else:
        groups = [per_ex[k:k + naive_micro] for k in range(0, 8, naive_micro)]
        loss = sum(sum(s for s, _ in g) / sum(n for _, n in g) for g in groups) / len(groups)
    loss.backward()
    return {n: (p - lr * p.grad).detach() for n, p in model.named_parameters()}


def maxdiff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# selection[:weighting]: the update of weighted runs must not depend on the layout either
METHODS = ("full", "sstoken", "sstoken:dft", "random:eaft", "full:asft", "sstoken+unlearned")


@pytest.fixture(scope="module")
def step_results(tiny_dir, tmp_path_factory):
    """Train one step in several layouts; returns {layout: {method: params}}."""
    out = tmp_path_factory.mktemp("steps")
    res = {}
    for pd, acc in [(8, 1), (1, 8), (4, 2)]:
        res[f"{pd}x{acc}"] = {}
        for m in METHODS:
            ddp_step.main(str(out / f"{pd}x{acc}.{m}.st"), tiny_dir, m, pd, acc, "full")
            res[f"{pd}x{acc}"][m] = load_file(str(out / f"{pd}x{acc}.{m}.st"))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(HERE / "ddp_step.py"), str(out / "ddp"), tiny_dir,
           ",".join(METHODS), "2", "2", "full"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res["ddp2x2x2"] = {m: load_file(str(out / f"ddp.{m}.st")) for m in METHODS}
    res["_dir"] = out
    return res


def test_full_step_matches_manual_reference(step_results, tiny_dir):
    ref = manual_sgd_step(tiny_dir)
    naive = manual_sgd_step(tiny_dir, naive_micro=1)
    assert maxdiff(ref, naive) > 1e-4             # the check below can tell them apart
    for layout, params in step_results.items():
        if layout != "_dir":
            assert maxdiff(params["full"], ref) < 2e-6, layout


def test_unlearned_rho_is_the_same_in_every_layout(step_results):
    """--rho_rule unlearned: step 2's rho counts step 1's tokens over all micro-batches and
    both processes, so it (and the update) does not depend on the layout."""
    import json

    rhos = {}
    for layout in ("8x1", "1x8", "4x2", "ddp"):
        path = step_results["_dir"] / f"{layout}.sstoken+unlearned.st.json"
        rhos[layout] = [h["sel/rho"] for h in json.loads(path.read_text()) if "loss" in h]
    assert rhos["8x1"][0] == 0.6 and rhos["8x1"][1] != 0.6        # step 1: --rho; step 2: the rule
    for layout, r in rhos.items():
        assert r == pytest.approx(rhos["8x1"], abs=1e-12), layout


def test_selection_statistics_cover_every_process(step_results, tmp_path_factory):
    """sel/* logged under 2-process DDP are sums over both ranks: equal to one process."""
    import json

    logs = {}
    for layout in ("8x1", "ddp"):
        for m in METHODS:
            path = step_results["_dir"] / f"{layout}.{m}.st.json"
            logs[layout, m] = next(h for h in json.loads(path.read_text()) if "loss" in h)
    for m in METHODS:
        one, two = logs["8x1", m], logs["ddp", m]
        keys = [k for k in one if k.startswith("sel/") and k != "sel/rel_attn_corr"]
        assert keys and "sel/kept_frac" in keys
        assert ("sel/weight_mean" in keys and "sel/nll_kept" in keys) == (":" in m)
        assert ("sel/rho" in keys) == ("+" in m)
        for k in keys:                 # corr is a mean over micro-batches, which differ in number
            assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), (m, k)


@pytest.mark.parametrize("layout", ["1x8", "4x2", "ddp2x2x2"])
def test_accumulation_and_ddp_equal_one_big_batch(step_results, layout):
    for m in METHODS:
        assert maxdiff(step_results[layout][m], step_results["8x1"][m]) < 2e-6, (layout, m)
    assert maxdiff(step_results["8x1"]["sstoken:dft"], step_results["8x1"]["sstoken"]) > 1e-4   # it weighs


# --------------------------------------------------------------------------- method exactness

def make_batch(tok, seed=0):
    recs = make_records(6, seed=seed, multi_turn=True)
    recs[2] = {"id": "one", "messages": [{"role": "user", "content": "the sea is wide"},
                                         {"role": "assistant", "content": "."}]}
    ex, _ = build_examples(((f"r{k}", r) for k, r in enumerate(recs)), tok)
    assert min(e.num_response_tokens for e in ex) <= 3
    return ex


def trainer_for(model, tok, ex, sel, **kw):
    import tempfile

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="sstoken-test-"), report_to="none",
                             remove_unused_columns=False, use_cpu=True, seed=0, max_steps=1)
    return SelectionTrainer(model=model, args=args, train_dataset=ExampleDataset(ex),
                            data_collator=Collator(tok.pad_token_id), processing_class=tok,
                            selection=sel, examples=ex, **kw)


def ref_cur_and_attn(model_sd, ex, layers=2, layer=-1):
    """Per example, alone and unpadded: token losses (loop over positions, full logits) and
    the attention mass on the prompt (eager attention, output_attentions)."""
    m = tiny_llama(300, layers=layers, attn_implementation="eager")
    m.load_state_dict(model_sd)
    cur, attn = [], []
    with torch.no_grad():
        for e in ex:
            out = m(input_ids=torch.tensor([e.input_ids]), output_attentions=True)
            lp = torch.log_softmax(out.logits[0].double(), -1)
            cur.append([0.0] + [-float(lp[i - 1, e.input_ids[i]]) for i in range(1, len(e.input_ids))])
            A = out.attentions[layer][0]                                 # (H, L, L)
            prompt = [lab == -100 for lab in e.labels]
            H = A.shape[0]
            attn.append([sum(float(A[h, i, j]) for h in range(H) for j in range(len(prompt))
                             if prompt[j]) / H for i in range(len(prompt))])
    return cur, attn


def resp_positions(e):
    return [i for i in range(1, len(e.labels)) if e.labels[i] != -100]


def ref_keep_per_sample(scores, ex, rho):
    keep = []
    for s, e in zip(scores, ex):
        pos = sorted(resp_positions(e), key=lambda i: (-s[i], i))
        k = math.ceil(Fraction(str(rho)) * len(pos))
        keep.append(set(pos[:k]))
    return keep


def ref_loss(cur, keep):
    return sum(cur[b][i] for b, ks in enumerate(keep) for i in ks) / sum(len(k) for k in keep)


def run_trainer_step(trainer, tok, ex):
    """The trainer's loss on one batch of ``ex``, and the keep mask of the same step through
    the same code path (``forward_select``, which ``compute_loss`` calls)."""
    batch = Collator(tok.pad_token_id)([ExampleDataset(ex)[k] for k in range(len(ex))])
    model = trainer.model
    with trainer.attention_hook():
        loss = trainer.compute_loss(model, batch)
        _, _, sel = trainer.forward_select(model, batch)
    sets = [set(torch.nonzero(sel.keep[b]).flatten().tolist()) for b in range(len(ex))]
    return float(loss), sets, sel.record


@pytest.mark.parametrize("rho", [0.2, 0.6, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_sstoken_matches_loop_reference(tok, rho, gamma):
    torch.manual_seed(0)
    model = tiny_llama(300, layers=2)
    ex = make_batch(tok)
    cur, attn = ref_cur_and_attn(model.state_dict(), ex)
    g = torch.Generator().manual_seed(9)
    hist = [[c + float(torch.randn(1, generator=g)) for c in cs] for cs in cur]   # a history model
    for e, h in zip(ex, hist):
        e.extra["history_loss"] = h
    sel = SelectionArguments(method="sstoken", rho=rho, gamma=gamma, save_scores=0)
    loss, keep, _ = run_trainer_step(trainer_for(model, tok, ex, sel), tok, ex)
    scores = []
    for b, e in enumerate(ex):
        R = resp_positions(e)
        rel = {i: hist[b][i] - cur[b][i] for i in R}
        lo, hi = min(rel.values()), max(rel.values())
        norm = {i: (rel[i] - lo) / (hi - lo) if hi > lo else 0.0 for i in R}
        scores.append({i: gamma * norm[i] + (1 - gamma) * attn[b][i] for i in R})
    want = ref_keep_per_sample(scores, ex, rho)
    assert keep == want
    assert abs(loss - ref_loss(cur, want)) < 1e-5


def test_sstoken_online_base_history_ties_at_step0(tok):
    """LoRA with B = 0: adapter-disabled and -enabled forwards agree exactly, so REL = 0 for
    every token; with gamma = 1 all scores tie and the earliest positions are kept."""
    import peft

    model = peft.get_peft_model(tiny_llama(300, layers=2),
                                peft.LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    ex = make_batch(tok)
    sel = SelectionArguments(method="sstoken", rho=0.6, gamma=1.0, save_scores=0)
    loss, keep, parts = run_trainer_step(trainer_for(model, tok, ex, sel), tok, ex)
    assert float(parts["rel"].abs().max()) == 0.0
    for e, ks in zip(ex, keep):
        R = resp_positions(e)
        assert ks == set(R[:math.ceil(Fraction("0.6") * len(R))])


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("rho", [0.2, 0.6, 1.0])
def test_rho1_matches_loop_reference(tok, scope, rho):
    model = tiny_llama(300, layers=2, seed=1)
    ex = make_batch(tok, seed=1)
    cur, _ = ref_cur_and_attn(model.state_dict(), ex)
    g = torch.Generator().manual_seed(3)
    ref_l = [[max(0.0, c + float(torch.randn(1, generator=g))) for c in cs] for cs in cur]
    for e, r in zip(ex, ref_l):
        e.extra["ref_loss"] = r
    sel = SelectionArguments(method="rho1", rho=rho, ref_model="x", scope=scope, save_scores=0)
    loss, keep, _ = run_trainer_step(trainer_for(model, tok, ex, sel), tok, ex)
    el = [{i: cur[b][i] - ref_l[b][i] for i in resp_positions(e)} for b, e in enumerate(ex)]
    if scope == "sample":
        want = ref_keep_per_sample(el, ex, rho)
    else:
        items = sorted((-s, b, i) for b, d in enumerate(el) for i, s in d.items())
        k = math.ceil(Fraction(str(rho)) * len(items))
        want = [set() for _ in ex]
        for _, b, i in items[:k]:
            want[b].add(i)
    assert keep == want
    assert abs(loss - ref_loss(cur, want)) < 1e-5


def test_full_and_random(tok):
    model = tiny_llama(300, layers=2)
    ex = make_batch(tok)
    cur, _ = ref_cur_and_attn(model.state_dict(), ex)
    loss, keep, _ = run_trainer_step(trainer_for(model, tok, ex, SelectionArguments(method="full")), tok, ex)
    want = [set(resp_positions(e)) for e in ex]
    assert keep == want and abs(loss - ref_loss(cur, want)) < 1e-5
    t = trainer_for(model, tok, ex, SelectionArguments(method="random", rho=0.6))
    l1, k1, _ = run_trainer_step(t, tok, ex)
    l2, k2, _ = run_trainer_step(t, tok, ex)
    assert k1 == k2                                              # reproducible per example
    for e, ks in zip(ex, k1):
        R = resp_positions(e)
        assert ks <= set(R) and len(ks) == math.ceil(Fraction("0.6") * len(R))
    assert abs(l1 - ref_loss(cur, k1)) < 1e-5


@pytest.mark.parametrize("scope", ["pool", "sample"])
@pytest.mark.parametrize("rho", [0.2, 0.6, 1.0])
def test_tokencleaning_offline_selection_and_step(tok, scope, rho):
    model = tiny_llama(300, layers=2)
    ex = make_batch(tok)
    g = torch.Generator().manual_seed(4)
    for e in ex:
        n = len(e.input_ids)
        e.extra["base_loss"] = torch.rand(n, generator=g).round(decimals=1).tolist()  # ties
        e.extra["ref_loss"] = torch.rand(n, generator=g).round(decimals=1).tolist()
    sc = [{i: e.extra["base_loss"][i] - e.extra["ref_loss"][i] for i in resp_positions(e)} for e in ex]
    pool_keep(ex, rho, scope)
    if scope == "pool":
        items = sorted((-s, b, i) for b, d in enumerate(sc) for i, s in d.items())
        k = math.floor(Fraction(str(rho)) * len(items))
        want = [set() for _ in ex]
        for _, b, i in items[:k]:
            want[b].add(i)
    else:
        want = ref_keep_per_sample(sc, ex, rho)
    got = [{i for i, v in enumerate(e.extra["keep"]) if v} for e in ex]
    assert got == want
    cur, _ = ref_cur_and_attn(model.state_dict(), ex)
    sel = SelectionArguments(method="tokencleaning", rho=rho, ref_model="x", save_scores=0)
    loss, keep, _ = run_trainer_step(trainer_for(model, tok, ex, sel), tok, ex)
    assert keep == want
    if sum(len(k) for k in want):
        assert abs(loss - ref_loss(cur, want)) < 1e-5


def test_rel_warmup_uses_attention_only(tok):
    model = tiny_llama(300, layers=2)
    ex = make_batch(tok)
    t = trainer_for(model, tok, ex, SelectionArguments(method="sstoken", gamma=0.7, rel_warmup=0.2))
    assert t.method.gamma(1, 10) == 0.0
    assert t.method.needs(1, 10).attention and not t.method.needs(1, 10).history
    assert t.method.gamma(2, 10) == 0.7
    assert t.method.needs(2, 10).history


def test_ema_of_adapter_factors_and_swap(tok):
    import peft

    model = peft.get_peft_model(tiny_llama(300, layers=2),
                                peft.LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj"]))
    ema = TrainableEMA(model, alpha=0.9)
    names = list(ema.params)
    assert names and all("lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in ema.params.items()}
    with torch.no_grad():
        for p in ema.params.values():
            p.add_(1.0)
    ema.update()
    for n, p in ema.params.items():
        assert torch.allclose(ema.shadow[n], 0.9 * before[n] + 0.1 * p)
    current = {n: p.detach().clone() for n, p in ema.params.items()}
    with ema.swapped():
        assert all(torch.equal(p, ema.shadow[n]) for n, p in ema.params.items())
    assert all(torch.equal(p, current[n]) for n, p in ema.params.items())


def test_ema_saved_then_bound_again_and_a_foreign_one_refused(tmp_path):
    """A loaded shadow takes effect at the next bind (training start, after the engine wrapped
    the model); one saved for other parameters is refused with its file named."""
    import peft
    import pytest

    from sstoken.errors import UsageError

    def lora(targets):
        return peft.get_peft_model(tiny_llama(300, layers=2),
                                   peft.LoraConfig(r=4, lora_dropout=0.0, target_modules=targets))

    ema = TrainableEMA(lora(["q_proj"]), alpha=0.9)
    for t in ema.shadow.values():
        t.add_(0.5)
    saved = ema.state_dict()
    TrainableEMA.save(saved, str(tmp_path))
    again = TrainableEMA(lora(["q_proj"]), alpha=0.9)
    again.load(str(tmp_path))
    assert not any(torch.equal(again.shadow[n], saved[n]) for n in saved)   # not before bind
    again.bind(again.model)
    assert all(torch.equal(again.shadow[n], saved[n]) for n in saved)
    other = TrainableEMA(lora(["v_proj"]), alpha=0.9)
    other.load(str(tmp_path))
    with pytest.raises(UsageError, match="sstoken_ema.safetensors: the saved history has no"):
        other.bind(other.model)


def test_training_logs_statistics_and_saves_scores(tok, tmp_path):
    import json

    model = tiny_llama(300, layers=2)
    ex = make_batch(tok)
    g = torch.Generator().manual_seed(1)
    for e in ex:
        e.extra["history_loss"] = (torch.rand(len(e.input_ids), generator=g) * 5).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", remove_unused_columns=False,
                             use_cpu=True, max_steps=2, per_device_train_batch_size=3, logging_steps=1)
    t = SelectionTrainer(model=model, args=args, train_dataset=ExampleDataset(ex),
                         data_collator=Collator(tok.pad_token_id), processing_class=tok,
                         selection=SelectionArguments(method="sstoken", save_scores=4), examples=ex)
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    for key in ("sel/kept_frac", "sel/rel_mean", "sel/attn_mean", "sel/rel_attn_corr", "sel/attn_driven_frac"):
        assert key in logs[0], key
    assert 0.6 <= logs[0]["sel/kept_frac"] <= 1.0
    path = t.write_records(str(tmp_path / "selection.jsonl"))
    recs = [json.loads(l) for l in open(path)]
    assert len(recs) == 4
    for r in recs:
        n = len(r["tokens"])
        assert all(len(r[k]) == n for k in ("response", "keep", "loss", "rel", "attn_score", "score", "by_attention"))
        assert all(r["response"][i] for i in range(n) if r["keep"][i])
        assert all(r["keep"][i] for i in range(n) if r["by_attention"][i])


def test_ema_history_forward_uses_the_averaged_adapter(tok):
    """history=ema: the history losses equal a plain forward of a copy whose adapter factors
    are the EMA; the trained weights are untouched afterwards."""
    import copy

    import peft

    from sstoken.modeling import forward_token_losses
    model = peft.get_peft_model(tiny_llama(300, layers=2),
                                peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    ex = make_batch(tok)
    t = trainer_for(model, tok, ex, SelectionArguments(method="sstoken", history="ema", ema_alpha=0.5))
    t.ema.bind(t.model)                             # what the trainer does when training starts
    with torch.no_grad():
        for p in t.ema.params.values():
            p.add_(torch.randn_like(p) * 0.1)
    t.ema.update()
    batch = Collator(tok.pad_token_id)([ExampleDataset(ex)[k] for k in range(len(ex))])
    resp = response_mask(batch["labels"])
    got = t.history.losses(model, batch["input_ids"], batch["attention_mask"], resp, 1024)
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if n in t.ema.shadow:
                p.copy_(t.ema.shadow[n])
        want = forward_token_losses(twin, batch["input_ids"], batch["attention_mask"], resp)
        now = forward_token_losses(model.eval(), batch["input_ids"], batch["attention_mask"], resp)
    assert (got - want).abs().max() < 1e-6
    assert (got - now).abs().max() > 1e-4          # the EMA differs from the current adapter


def ref_attn_without_sink(model_sd, ex, n_sink, layers=2, layer=-1):
    """Per example: each head's mass on non-sink prompt keys over its mass on non-sink keys,
    averaged over heads (eager attention, loops), the sinks being the first n_sink tokens."""
    m = tiny_llama(300, layers=layers, attn_implementation="eager")
    m.load_state_dict(model_sd)
    out_all = []
    with torch.no_grad():
        for e in ex:
            A = m(input_ids=torch.tensor([e.input_ids]), output_attentions=True).attentions[layer][0]
            L, H = len(e.input_ids), A.shape[0]
            prompt = [lab == -100 for lab in e.labels]
            row = []
            for i in range(L):
                per_head = []
                for h in range(H):
                    rest = sum(float(A[h, i, j]) for j in range(n_sink, L))
                    on_p = sum(float(A[h, i, j]) for j in range(n_sink, L) if prompt[j])
                    per_head.append(on_p / rest if rest > 1e-6 else 0.0)
                row.append(sum(per_head) / H)
            out_all.append(row)
    return out_all


def loop_percentile(vals: dict) -> dict:
    """Per-sample percentile with average ranks for ties (the reference of --normalize rank)."""
    n = len(vals)
    out = {}
    for i, v in vals.items():
        less, equal = sum(u < v for u in vals.values()), sum(u == v for u in vals.values())
        out[i] = 0.5 if n == 1 else (less + (equal - 1) / 2) / (n - 1)
    return out


@pytest.mark.parametrize("normalize,attn_sink", [("rank", 0), ("minmax", 1), ("rank", 2)])
def test_sstoken_rank_and_sink_match_loop_reference(tok, normalize, attn_sink):
    """--normalize rank (both signals to per-sample percentiles) and --attn_sink (the first
    tokens out of the attention score, the rest renormalized): keep mask and loss against
    loops over eager attention probabilities."""
    torch.manual_seed(0)
    model = tiny_llama(300, layers=2)
    ex = make_batch(tok)
    cur, attn = ref_cur_and_attn(model.state_dict(), ex)
    if attn_sink:
        attn = ref_attn_without_sink(model.state_dict(), ex, attn_sink)
    g = torch.Generator().manual_seed(9)
    hist = [[c + float(torch.randn(1, generator=g)) for c in cs] for cs in cur]
    for e, h in zip(ex, hist):
        e.extra["history_loss"] = h
    gamma, rho = 0.5, 0.6
    sel = SelectionArguments(method="sstoken", rho=rho, gamma=gamma, save_scores=0,
                             normalize=normalize, attn_sink=attn_sink)
    loss, keep, rec = run_trainer_step(trainer_for(model, tok, ex, sel), tok, ex)
    scores, drivers = [], []
    for b, e in enumerate(ex):
        R = resp_positions(e)
        rel = {i: hist[b][i] - cur[b][i] for i in R}
        a = {i: attn[b][i] for i in R}
        for i in R:
            assert abs(float(rec["attn_score"][b, i]) - a[i]) < 1e-5
        if normalize == "rank":
            rn, an = loop_percentile(rel), loop_percentile(a)
        else:
            lo, hi = min(rel.values()), max(rel.values())
            rn, an = {i: (rel[i] - lo) / (hi - lo) if hi > lo else 0.0 for i in R}, a
        mix = {i: gamma * rn[i] + (1 - gamma) * an[i] for i in R}
        scores.append({i: round(v, 12) for i, v in mix.items()} if normalize == "rank" else mix)
        drivers.append({i for i in R if (1 - gamma) * an[i] > gamma * rn[i]})
    want = ref_keep_per_sample(scores, ex, rho)
    assert keep == want
    for b, (w, drv) in enumerate(zip(want, drivers)):     # "kept mainly by attention", on the mixed scale
        assert set(torch.nonzero(rec["by_attention"][b]).flatten().tolist()) == w & drv
    assert abs(loss - ref_loss(cur, want)) < 1e-5
    assert ("attn_norm" in rec) == (normalize == "rank")


def test_unlearned_rho_follows_the_previous_step(tok, tmp_path):
    """--rho_rule unlearned: step 1 keeps --rho; step 2 keeps the share of step 1's response
    tokens with p < --learned_prob, counted from the loop reference of the untrained model."""
    torch.manual_seed(0)
    model = tiny_llama(300, layers=2)
    ex = make_batch(tok)
    cur, _ = ref_cur_and_attn(model.state_dict(), ex)
    for e in ex:
        e.extra["history_loss"] = [0.0] * len(e.input_ids)
    losses = sorted(cur[b][i] for b, e in enumerate(ex) for i in resp_positions(e))
    p = math.exp(-losses[len(losses) // 3])         # about 2/3 of the tokens "unlearned"
    unl = sum(cur[b][i] > -math.log(p) for b, e in enumerate(ex) for i in resp_positions(e))
    n = sum(len(resp_positions(e)) for e in ex)
    want = max(0.1, unl / n)
    assert 0.1 < want < 0.9
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", remove_unused_columns=False,
                             use_cpu=True, max_steps=2, per_device_train_batch_size=6, logging_steps=1,
                             learning_rate=1e-3)
    sel = SelectionArguments(method="sstoken", rho_rule="unlearned", learned_prob=p, save_scores=6)
    t = SelectionTrainer(model=model, args=args, train_dataset=ExampleDataset(ex),
                         data_collator=Collator(tok.pad_token_id), processing_class=tok,
                         selection=sel, examples=ex)
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert logs[0]["sel/rho"] == 0.6
    assert logs[1]["sel/rho"] == pytest.approx(want, abs=1e-12)
    kept = sum(math.ceil(Fraction(str(round(want, 12))) * len(resp_positions(e))) for e in ex)
    assert logs[1]["sel/kept_frac"] == pytest.approx(kept / n, abs=1e-9)
    assert all(r["rho"] == pytest.approx(want) for r in t.records.values())


def test_epoch_history_is_the_model_at_the_start_of_the_epoch(tok):
    """--history epoch: in epoch 0 the history is the model as it was at the start (with
    LoRA, the base model); when epoch 1 begins it becomes the weights of that moment."""
    import peft

    from sstoken.modeling import adapter_disabled, forward_token_losses
    model = peft.get_peft_model(tiny_llama(300, layers=2),
                                peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    ex = make_batch(tok)
    t = trainer_for(model, tok, ex, SelectionArguments(method="sstoken", history="epoch"))
    t.history.ema.bind(t.model)                     # what the trainer does when training starts
    batch = Collator(tok.pad_token_id)([ExampleDataset(ex)[k] for k in range(len(ex))])
    resp = response_mask(batch["labels"])
    args = batch["input_ids"], batch["attention_mask"], resp

    def plain(m):
        with torch.no_grad():
            return forward_token_losses(m.eval(), *args)

    with adapter_disabled(model):
        base = plain(model)
    with torch.no_grad():                           # "training" moves the adapter
        for p in t.history.ema.params.values():
            p.add_(torch.randn_like(p) * 0.1)
    moved = plain(model)
    assert (moved - base).abs().max() > 1e-4
    t.history.start_epoch(0)                        # still epoch 0: no new copy
    assert (t.history.losses(model, *args, 1024) - base).abs().max() < 1e-6
    t.history.start_epoch(1)
    assert (t.history.losses(model, *args, 1024) - moved).abs().max() < 1e-6
    assert (plain(model) - moved).abs().max() == 0  # the live weights are untouched


def test_checkpoint_resume_gives_the_same_model(tok, tmp_path):
    """Two steps straight, or one step, a checkpoint, and a resumed second step: same weights
    (sstoken with EMA history, whose state travels with the checkpoint)."""
    import peft

    ex = make_batch(tok)

    def run(out, max_steps, resume=None):
        torch.manual_seed(0)
        model = peft.get_peft_model(tiny_llama(300, layers=2),
                                    peft.LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        args = TrainingArguments(output_dir=str(out), report_to="none", remove_unused_columns=False,
                                 use_cpu=True, max_steps=max_steps, per_device_train_batch_size=3,
                                 save_strategy="steps", save_steps=1, learning_rate=1e-2, seed=0)
        sel = SelectionArguments(method="sstoken", history="ema", ema_alpha=0.5, save_scores=0)
        t = SelectionTrainer(model=model, args=args, train_dataset=ExampleDataset(ex),
                             data_collator=Collator(tok.pad_token_id), processing_class=tok,
                             selection=sel, examples=ex)
        t.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, t

    straight, _ = run(tmp_path / "a", 2)
    run(tmp_path / "b", 2)
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoint-2")
    assert (tmp_path / "b" / "checkpoint-1" / "sstoken_ema.safetensors").exists()
    resumed, t = run(tmp_path / "b", 2, resume=str(tmp_path / "b" / "checkpoint-1"))
    assert max((straight[n] - resumed[n]).abs().max().item() for n in straight) < 1e-6
