"""Resuming: an interrupted run continued from its checkpoint ends with the same outputs as an
uninterrupted one (weights, selection.jsonl, the summary, the logged statistics), and only a
checkpoint whose files were all written counts."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sstoken.cli import main


def train(tiny_dir, data, out, method, *extra):
    flags = {"sstoken-ema": ["--method", "sstoken", "--history", "ema", "--ema_alpha", "0.5"],
             "random": ["--method", "random"], "sstoken": ["--method", "sstoken"],
             # 6 examples at batch 2: epochs of 3 steps, so step 4 is in epoch 2
             "sstoken-epoch": ["--method", "sstoken", "--history", "epoch", "--max_samples", "6"],
             "sstoken-unlearned": ["--method", "sstoken", "--rho_rule", "unlearned",
                                   "--normalize", "rank", "--attn_sink", "1"]}[method]
    assert main(["train", "--model", tiny_dir, "--data", str(data), "--lora_r", "4", "--lora_dropout", "0.1",
                 "--max_steps", "4", "--per_device_train_batch_size", "2", "--save_strategy", "steps",
                 "--save_steps", "1", "--learning_rate", "1e-2", "--save_scores", "8", "--use_cpu", "true",
                 "--seed", "3", "--output_dir", str(out), *flags, *extra]) == 0


def outputs(out):
    summary = json.loads((out / "sstoken_run.json").read_text())
    records = {r["id"]: r for r in map(json.loads, (out / "selection.jsonl").read_text().splitlines())}
    weights = load_file(str(out / "adapter_model.safetensors"))
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [{k: v for k, v in h.items() if k.startswith("sel/") or k == "loss"}
            for h in state["log_history"] if "loss" in h]
    return summary, records, weights, logs


@pytest.mark.parametrize("method,cut", [("sstoken-ema", 2), ("random", 2), ("sstoken-epoch", 2),
                                        ("sstoken-epoch", 3), ("sstoken-unlearned", 2)])
def test_resumed_run_equals_an_uninterrupted_one(method, cut, tiny_dir, tmp_path, records):
    """Cut after checkpoint ``cut``; for --history epoch, 2 is mid-epoch and 3 the boundary."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(8, seed=2)))
    train(tiny_dir, data, tmp_path / "straight", method)
    train(tiny_dir, data, tmp_path / "cut", method)
    cut, cut_at = tmp_path / "cut", cut
    # the run "died" after checkpoint-<cut>: later checkpoints and every final output are gone
    for name in [f"checkpoint-{k}" for k in range(cut_at + 1, 5)]:
        shutil.rmtree(cut / name)
    for p in cut.iterdir():
        if p.is_file():
            p.unlink()
    state_file = cut / f"checkpoint-{cut_at}" / "sstoken_state.json"
    state = json.loads(state_file.read_text())
    state["seconds"] = 1000.0                               # as if the first part took 1000 s
    state_file.write_text(json.dumps(state))
    train(tiny_dir, data, cut, method, "--resume_from_checkpoint", "true")
    (s1, r1, w1, l1), (s2, r2, w2, l2) = outputs(tmp_path / "straight"), outputs(cut)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6
    n = 6 if method == "sstoken-epoch" else 8
    assert r1.keys() == r2.keys() and len(r1) == n          # every example, also those seen before
    for i in r1:
        assert r1[i]["keep"] == r2[i]["keep"] and r1[i]["step"] == r2[i]["step"]
        assert r1[i]["loss"] == pytest.approx(r2[i]["loss"], abs=1e-6)
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)
    for k in ("steps", "kept_frac", "first_loss", "last_loss", "examples"):
        assert s1[k] == pytest.approx(s2[k], abs=1e-6), k
    assert 1000 <= s2["seconds"] < 1000 + 600               # the time before the interruption counts


def test_only_complete_checkpoints_are_resumed(tiny_dir, tmp_path, records):
    from sstoken.trainer import last_complete_checkpoint

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(8, seed=2)))
    out = tmp_path / "o"
    train(tiny_dir, data, out, "sstoken-ema")
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"):
        files = {p.name for p in (out / name).iterdir()}
        assert {"trainer_state.json", "sstoken_state.json", "sstoken_ema.safetensors"} <= files
    assert last_complete_checkpoint(str(out)).endswith("checkpoint-4")
    (out / "checkpoint-4" / "trainer_state.json").unlink()          # killed while writing it
    (out / "checkpoint-3" / "sstoken_state.json").unlink()          # written by another tool
    assert last_complete_checkpoint(str(out)).endswith("checkpoint-2")
    torch.manual_seed(0)
    for p in out.iterdir():
        if p.is_file():
            p.unlink()
    train(tiny_dir, data, out, "sstoken-ema", "--resume_from_checkpoint", "auto")
    assert json.loads((out / "sstoken_run.json").read_text())["steps"] == 4
