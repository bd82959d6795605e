"""sstoken.integrations.trl: TRL's SFTTrainer with sstoken's selection gives the keep mask,
loss and gradients of sstoken's own trainer on the same batch, the same update under gradient
accumulation, honours TRL's masks, and refuses packing / padding-free."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import trl  # noqa: F401,E402  - the extra sstoken[trl], installed by scripts/setup.sh: fail, never skip

from datasets import Dataset  # noqa: E402

from sstoken.args import SelectionArguments  # noqa: E402
from sstoken.data import Collator, ExampleDataset  # noqa: E402
from sstoken.errors import UsageError  # noqa: E402
from sstoken.integrations.trl import SSTokenSFTConfig, SSTokenSFTTrainer  # noqa: E402
from sstoken.testing import tiny_llama  # noqa: E402
from sstoken.trainer import SelectionTrainer  # noqa: E402

from conftest import sentence  # noqa: E402

import random  # noqa: E402


def dataset(n=8, conversational=False, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, c = sentence(rng, rng.randint(3, 7)), " " + sentence(rng, rng.randint(2, 8))
        rows.append({"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
                    if conversational else {"prompt": p, "completion": c})
    return Dataset.from_list(rows)


def config(**kw):
    base = dict(output_dir=tempfile.mkdtemp(prefix="sstoken-trl-"), use_cpu=True, report_to="none",
                save_strategy="no", logging_steps=1, max_steps=1, per_device_train_batch_size=4,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                gradient_checkpointing=False, seed=0, dataloader_drop_last=False, shuffle_dataset=False,
                bf16=False)
    base.update(kw)
    return SSTokenSFTConfig(**base)


def trl_trainer(tok, **kw):
    torch.manual_seed(0)
    model = tiny_llama(len(tok), layers=2, seed=0)
    return SSTokenSFTTrainer(model=model, args=config(**kw), train_dataset=dataset(), processing_class=tok)


@pytest.mark.parametrize("method", ["full", "random", "sstoken", "rho1", "tokencleaning"])
def test_same_keep_loss_and_gradients_as_sstokens_trainer(tok, tmp_path, method):
    extra = {}
    if method in ("rho1", "tokencleaning"):
        ref = tmp_path / "ref"
        tiny_llama(len(tok), layers=2, seed=5).save_pretrained(ref)
        tok.save_pretrained(ref)
        extra = {"ref_model": str(ref)}
    import os

    os.environ["SSTOKEN_CACHE"] = str(tmp_path / "cache")
    try:
        t = trl_trainer(tok, method=method, **extra)
    finally:
        del os.environ["SSTOKEN_CACHE"]
    # sstoken's own trainer on the same examples (TRL's tokenization) and an identical model
    own_model = tiny_llama(len(tok), layers=2, seed=0)
    own_model.load_state_dict(t.model.state_dict())
    own = SelectionTrainer(model=own_model, args=t.args, train_dataset=ExampleDataset(t.examples),
                           data_collator=Collator(tok.pad_token_id), processing_class=tok,
                           selection=SelectionArguments(method=method, **extra), examples=t.examples)
    rows = [t.train_dataset[i] for i in range(4)]
    trl_batch = t.data_collator(rows)
    own_batch = Collator(tok.pad_token_id)([ExampleDataset(t.examples)[i] for i in range(4)])
    for k in ("input_ids", "labels", "attention_mask", "index"):
        assert torch.equal(trl_batch[k], own_batch[k]), k
    for k in ("history_loss", "ref_loss", "keep"):
        assert (k in trl_batch) == (k in own_batch), k
        if k in trl_batch:
            assert torch.allclose(trl_batch[k], own_batch[k]), k
    results = []
    for trainer, batch in ((t, trl_batch), (own, own_batch)):
        trainer.model.zero_grad()
        with trainer.attention_hook():
            loss = trainer.compute_loss(trainer.model, batch)
            _, _, sel = trainer.forward_select(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((float(loss), sel.keep, grads))
    (l1, k1, g1), (l2, k2, g2) = results
    assert torch.equal(k1, k2)
    assert abs(l1 - l2) < 1e-6
    assert g1.keys() == g2.keys() and max((g1[n] - g2[n]).abs().max().item() for n in g1) < 1e-6


def test_gradient_accumulation_gives_the_same_update(tok):
    weights = []
    for bs, acc in ((4, 1), (1, 4), (2, 2)):
        t = trl_trainer(tok, method="sstoken", per_device_train_batch_size=bs, gradient_accumulation_steps=acc)
        t.train()
        weights.append({n: p.detach().clone() for n, p in t.model.named_parameters()})
    for w in weights[1:]:
        assert max((w[n] - weights[0][n]).abs().max().item() for n in w) < 2e-6


def test_trl_masks_define_the_response(tok):
    t = trl_trainer(tok, method="full")
    for e, row in zip(t.examples, t.train_dataset):
        assert e.labels == row["labels"] and -100 in e.labels[1:]      # completion_only_loss: prompt masked
    conv = SSTokenSFTTrainer(model=tiny_llama(len(tok)), args=config(method="full"),
                             train_dataset=dataset(conversational=True), processing_class=tok)
    assert all(-100 in e.labels[1:] for e in conv.examples)
    whole = SSTokenSFTTrainer(model=tiny_llama(len(tok)), args=config(method="full", completion_only_loss=False),
                              train_dataset=dataset(), processing_class=tok)
    assert all(-100 not in e.labels[1:] for e in whole.examples)   # every token trained, as TRL does
    with pytest.raises(UsageError, match="attention score needs a prompt"):
        SSTokenSFTTrainer(model=tiny_llama(len(tok)), args=config(method="sstoken", completion_only_loss=False),
                          train_dataset=dataset(), processing_class=tok)


@pytest.mark.parametrize("kw", [{"packing": True, "max_length": 64}, {"padding_free": True}])
def test_packing_and_padding_free_are_refused(kw):
    with pytest.raises(UsageError, match="packing / padding_free"):
        config(method="sstoken", **kw)


def test_config_reports_every_selection_problem():
    with pytest.raises(UsageError) as e:
        config(method="rho1", rho=0, gamma=2)
    assert len(e.value.problems) == 3


def test_example_script_runs_two_steps(tmp_path, tiny_dir):
    script = Path(__file__).parents[1] / "examples" / "trl_sft.py"
    p = subprocess.run([sys.executable, str(script), "--model", tiny_dir, "--max_steps", "2",
                        "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(0 < h["sel/kept_frac"] < 1 for h in logs)
    assert (tmp_path / "out" / "selection.jsonl").exists()


def test_core_imports_without_trl():
    code = ("import sys; sys.modules['trl'] = None; import sstoken, sstoken.cli, sstoken.trainer; "
            "import sstoken.integrations\n"
            "try:\n import sstoken.integrations.trl\nexcept ImportError as e:\n print('hint', 'sstoken[trl]' in str(e))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0 and "hint True" in p.stdout, p.stderr



def test_evaluation_reports_the_plain_loss(tok):
    t = SSTokenSFTTrainer(model=tiny_llama(len(tok)), args=config(method="sstoken", eval_strategy="no"),
                          train_dataset=dataset(), eval_dataset=dataset(n=4, seed=9), processing_class=tok)
    metrics = t.evaluate()
    assert metrics["eval_loss"] > 0 and metrics["eval_loss"] == metrics["eval_loss"]
