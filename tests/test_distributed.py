"""Two processes (torchrun, gloo on CPU) through the real command line: the run's outputs cover
every rank (selection.jsonl holds each saved example once, sel/* are sums over both ranks) and
equal a one-process run at the same global batch. (The update itself: test_trainer.py.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

from sstoken.cli import main
from sstoken.testing import free_port


def test_two_processes_write_whole_run_outputs(tiny_dir, tmp_path, records):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(8, seed=4, multi_turn=True)))
    common = ["--model", tiny_dir, "--data", str(data), "--method", "sstoken", "--lora_r", "4",
              "--lora_dropout", "0", "--max_steps", "2", "--save_scores", "8", "--use_cpu", "true",
              "--learning_rate", "1e-2", "--seed", "1",
              # step 2's rho counts step 1's tokens on both ranks; checkpoints save it collectively
              "--rho_rule", "unlearned", "--save_strategy", "steps", "--save_steps", "1"]
    assert main(["train", *common, "--per_device_train_batch_size", "4",
                 "--output_dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "sstoken.cli", "train", *common, "--per_device_train_batch_size", "2",
           "--output_dir", str(tmp_path / "two")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    def read(run):
        recs = [json.loads(line) for line in (tmp_path / run / "selection.jsonl").read_text().splitlines()]
        return recs, json.loads((tmp_path / run / "sstoken_run.json").read_text())

    (one, s1), (two, s2) = read("one"), read("two")
    assert sorted(r["id"] for r in two) == sorted(f"ex{k}" for k in range(8))      # each once
    assert [r["id"] for r in one] == [r["id"] for r in two]                        # data order
    for a, b in zip(one, two):
        assert a["keep"] == b["keep"] and a["step"] == b["step"], a["id"]
    assert s2["kept_frac"] == s1["kept_frac"] and s2["steps"] == s1["steps"] == 2
    states = [json.loads((tmp_path / run / "checkpoint-1" / "sstoken_state.json").read_text())
              for run in ("one", "two")]
    assert states[0]["unlearned"] == states[1]["unlearned"] and states[0]["unlearned"][1] > 0
    rhos = {(r["step"], r["rho"]) for r in one + two}
    assert {s for s, _ in rhos} == {0, 1} and len(rhos) == 2      # one rho per step, on both runs
    assert dict(rhos)[0] == 0.6 and dict(rhos)[1] != 0.6          # step 2 ran with the rule's rho
    assert p.stderr.count("done in") == 1                      # rank 0 logs, the other does not


def test_several_gpus_without_a_launcher_are_refused(monkeypatch):
    import torch

    import sstoken
    from sstoken.errors import UsageError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        sstoken.train(model="/nonexistent-model", output_dir="/nonexistent-out/x")
    except UsageError as e:
        text = str(e)
    assert "4 GPUs are visible but this is one process" in text and "torchrun --nproc_per_node 4" in text


def test_sharded_engine_combinations_are_refused_up_front(monkeypatch):
    """Only a frozen whole copy of the model per GPU is refused, and only where the engine
    shards the model (FSDP, ZeRO-3); the EMA history and the chunked loss run everywhere
    (test_engines.py)."""
    from sstoken.args import parse
    from sstoken.errors import UsageError
    from sstoken.runs import check_launch, engine

    def problems(args):
        m, f, d, s, t = args
        try:
            check_launch(m, f, s, t)
        except UsageError as e:
            return e.problems
        return []

    # Parsed before the engine's variables are set: under ACCELERATE_USE_DEEPSPEED, parsing
    # builds DeepSpeed's plugin, which needs DeepSpeed installed (the default suite has none).
    online = parse("train", ["--finetune", "full", "--history_losses", "online", "--use_cpu", "true"])
    asft = parse("train", ["--finetune", "full", "--weighting", "asft", "--use_cpu", "true"])
    fine = [parse("train", f) for f in (["--history", "ema", "--finetune", "full", "--use_cpu", "true"],
                                        ["--history", "epoch", "--use_cpu", "true"],
                                        ["--weighting", "asft", "--use_cpu", "true"])]   # chunked loss
    assert engine(online[4]) == ("ddp", 0)
    assert problems(online) == problems(asft) == []                         # DDP: all fine
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")        # saving gathers nothing:
    got = problems(fine[0])                                            # a full model is refused
    assert len(got) == 1 and "would end with no model file" in got[0] and "zero3_save_16bit_model" in got[0]
    assert problems(fine[1]) == []                                     # LoRA: the adapter is saved
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true")   # as zero3.yaml
    for stage, refused in (("3", True), ("2", False)):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
        assert engine(online[4]) == ("deepspeed", int(stage))
        assert all(problems(f) == [] for f in fine)
        got = problems(online) + problems(asft)
        if not refused:                                   # ZeRO-2 keeps a whole model per GPU
            assert got == []
            continue
        assert len(got) == 2 and "online base history under DeepSpeed ZeRO-3" in got[0]
        assert "run `sstoken score` first" in got[0] and "frozen unsharded copy" in got[1]
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    got = problems(fine[1])                      # accelerate's default FSDP version is 1
    assert len(got) == 1 and got[0].startswith("FSDP1 is not supported") and "fsdp2.yaml" in got[0]
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert all(problems(f) == [] for f in fine)
    got = problems(online)
    assert len(got) == 1 and "under FSDP needs a frozen unsharded copy" in got[0]
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    v1 = parse("train", ["--fsdp", "full_shard", "--fsdp_config", '{"version": 1}', "--use_cpu", "true"])
    assert problems(v1)[0].startswith("FSDP1 is not supported")
    assert problems(parse("train", ["--fsdp", "full_shard", "--use_cpu", "true"])) == []   # 2


def test_same_command_same_seed_gives_bit_identical_weights(tiny_dir, tmp_path, records):
    """Adapter init, dropout and random selection are seeded by --seed: whatever ran before in
    the process, the same command gives the same weights (LoRA and full fine-tuning)."""
    import torch
    from safetensors.torch import load_file

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(8, seed=6)))
    runs = {"full": ["--method", "full"], "random": ["--method", "random"],
            "sstoken": ["--method", "sstoken"],
            "sstoken-ema-fullft": ["--method", "sstoken", "--history", "ema", "--finetune", "full"]}
    for name, flags in runs.items():
        weights = []
        for attempt in range(2):
            torch.manual_seed(1000 + attempt)                       # a different global state
            out = tmp_path / f"{name}-{attempt}"
            assert main(["train", "--model", tiny_dir, "--data", str(data), "--lora_r", "4",
                         "--lora_dropout", "0.3", "--max_steps", "2", "--per_device_train_batch_size", "4",
                         "--learning_rate", "1e-2", "--seed", "7", "--use_cpu", "true", "--save_scores", "0",
                         "--output_dir", str(out), *flags]) == 0
            f = "model.safetensors" if "--finetune" in flags else "adapter_model.safetensors"
            weights.append(load_file(str(out / f)))
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), name


def test_shipped_accelerate_configs_select_their_engine(monkeypatch):
    """configs/accelerate/*.yaml, read by accelerate's own launcher code, set the variables
    that `sstoken train` reads to know its engine, and the engine's refusals follow."""
    import pytest
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from sstoken.args import parse
    from sstoken.errors import UsageError
    from sstoken.runs import check_launch, engine

    root = Path(__file__).parents[1] / "configs" / "accelerate"
    want = {"ddp": ("ddp", 0), "fsdp2": ("fsdp", 0), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}
    assert {p.stem for p in root.glob("*.yaml")} == set(want)
    defaults = parse("train", ["--use_cpu", "true"])                    # LoRA, chunked loss
    full = parse("train", ["--use_cpu", "true", "--finetune", "full", "--history_losses", "online"])
    keys = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
            "FSDP_VERSION", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")
    for name, expected in want.items():
        for k in keys:                                  # the launcher copies os.environ
            monkeypatch.delenv(k, raising=False)
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
            ["--config_file", str(root / f"{name}.yaml"), "x.py"]))
        if name.startswith("zero"):
            args.deepspeed_fields_from_accelerate_config = []          # set by `accelerate launch`
            env = prepare_deepspeed_cmd_env(args)[1]
        else:
            env = prepare_multi_gpu_env(args)
        for k in keys:
            if k in env:
                monkeypatch.setenv(k, env[k])
        assert engine(defaults[4]) == expected, name
        m, f, d, s, t = defaults
        check_launch(m, f, s, t)                                        # every engine
        m, f, d, s, t = full
        if name in ("fsdp2", "zero3"):                                  # a whole frozen copy
            with pytest.raises(UsageError, match="online base history under"):
                check_launch(m, f, s, t)
        else:
            check_launch(m, f, s, t)
