"""Every method, LoRA and full fine-tuning, under 2-process DDP, FSDP2 and DeepSpeed ZeRO-2 and
ZeRO-3 (CPU, gloo): the update equals the one-process update at the same global
batch, within 1e-5 in float32 with dropout off. sstoken runs two steps (at step 1 the base
model is the model being trained, so REL against it is 0), and so does ``--rho_rule unlearned``.

FSDP2 and DeepSpeed run through accelerate's and DeepSpeed's own wrapping code. On CPU
accelerate chooses neither (it only does for GPU-type backends), so ``engine_step.py`` applies
a test shim, ``relabel_cpu_as_gpu``, that changes only that label (backend gloo, device CPU);
see its docstring. The chunked loss runs with ``--loss_chunk_size 8`` (many chunks per
forward) over a sharded head (FSDP2 reshards after forward; ZeRO-3 partitions the head).

Slow (about 6 minutes on 2 cores; DeepSpeed needed: ``pip install -e .[deepspeed]``):
``pytest -m engines``. The default suite runs one FSDP2 case (``test_fsdp2_quick``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sstoken.testing import free_port

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import engine_step  # noqa: E402

# One per method and history ("@cached": history losses read from the loss cache).
LORA = ("full", "random", "rho1", "tokencleaning", "sstoken", "sstoken@cached", "sstoken@ema",
        "sstoken@epoch", "sstoken+unlearned", "sstoken:dft", "random:eaft", "full:asft")
# Full fine-tuning. The online base history and ASFT's reference are a frozen whole copy of
# the model: refused under FSDP and ZeRO-3 (test_distributed.py), run on DDP and ZeRO-2.
FULL = ("full", "random", "rho1", "tokencleaning", "sstoken@cached", "sstoken@ema", "sstoken@epoch",
        "sstoken+unlearned@cached", "random:eaft")
WHOLE_COPY = ("sstoken", "full:asft")
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory, tok):
    """rho1's and tokencleaning's reference: another tiny model of the same shape."""
    from sstoken.testing import tiny_llama

    d = tmp_path_factory.mktemp("ref")
    tiny_llama(len(tok), layers=2, seed=1).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def one_process(out: Path, tiny_dir, ref_dir, methods, finetune):
    for m in methods:
        engine_step.main(str(out / f"one.{m}.st"), tiny_dir, m, 8, 1, finetune, "ddp", ref_dir)
    return {m: load_file(str(out / f"one.{m}.st")) for m in methods}


def two_processes(out: Path, tiny_dir, ref_dir, methods, finetune, engine):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(HERE / "engine_step.py"), str(out / engine), tiny_dir, ",".join(methods),
           "2", "2", finetune, engine, ref_dir]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {m: load_file(str(out / f"{engine}.{m}.st")) for m in methods}


def check_same(one, two, engine):
    for m, w1 in one.items():
        w2 = two[m]
        assert set(w1) == set(w2) and w1, (engine, m)
        if any("lora_B" in k for k in w1):                 # B starts at 0: the step moved it
            assert max(float(v.abs().max()) for k, v in w1.items() if "lora_B" in k) > 1e-6, (engine, m)
        diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        assert diff < 1e-5, (engine, m, diff)


@pytest.fixture(scope="module")
def lora_one(tmp_path_factory, tiny_dir, ref_dir):
    return one_process(tmp_path_factory.mktemp("lora"), tiny_dir, ref_dir, LORA, "lora")


@pytest.fixture(scope="module")
def full_one(tmp_path_factory, tiny_dir, ref_dir):
    return one_process(tmp_path_factory.mktemp("full"), tiny_dir, ref_dir, FULL + WHOLE_COPY, "full")


@pytest.mark.engines
@pytest.mark.parametrize("engine", ENGINES)
def test_lora_every_method_every_engine(engine, lora_one, tiny_dir, ref_dir, tmp_path):
    check_same(lora_one, two_processes(tmp_path, tiny_dir, ref_dir, LORA, "lora", engine), engine)


@pytest.mark.engines
@pytest.mark.parametrize("engine", ENGINES)
def test_full_finetuning_every_method_every_engine(engine, full_one, tiny_dir, ref_dir, tmp_path):
    methods = FULL + (WHOLE_COPY if engine in ("ddp", "zero2") else ())
    two = two_processes(tmp_path, tiny_dir, ref_dir, methods, "full", engine)
    check_same({m: full_one[m] for m in methods}, two, engine)


def test_fsdp2_quick(tiny_dir, ref_dir, tmp_path):
    """The default suite's guard (no DeepSpeed needed): FSDP2 with the EMA history (bound to
    the sharded parameters) and the chunked loss over the resharded head."""
    methods = ("sstoken@ema",)
    one = one_process(tmp_path, tiny_dir, ref_dir, methods, "full")
    check_same(one, two_processes(tmp_path, tiny_dir, ref_dir, methods, "full", "fsdp2"), "fsdp2")


RESUMED = ("sstoken@ema", "sstoken@epoch")


@pytest.fixture(scope="module")
def resumed_one(tmp_path_factory, tiny_dir, ref_dir):
    out = tmp_path_factory.mktemp("resume")
    return {ft: one_process(out, tiny_dir, ref_dir, [f"{m}!3" for m in RESUMED], ft)
            for ft in ("lora", "full")}


@pytest.mark.engines
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("finetune", ("lora", "full"))
def test_history_saved_and_resumed_under_every_engine(engine, finetune, resumed_one, tiny_dir,
                                                      ref_dir, tmp_path):
    """Three steps (three epochs of the 8 examples), stopped after step 1 and resumed in a new
    trainer from its checkpoint: the EMA (gathered whole to save, split again to load) and the
    epoch copy come back, and the weights equal three uninterrupted steps in one process. (With
    the EMA dropped at the resume, this differs by 0.04.)"""
    two = two_processes(tmp_path, tiny_dir, ref_dir, [f"{m}!resume" for m in RESUMED], finetune, engine)
    check_same(resumed_one[finetune], {f"{m}!3": two[f"{m}!resume"] for m in RESUMED}, engine)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tok):
    """A tiny model whose LM head is its input embedding (as SmolLM2, Llama-3.2-1B, Qwen2.5)."""
    from sstoken.testing import tiny_llama

    d = tmp_path_factory.mktemp("tied")
    tiny_llama(len(tok), layers=2, tie=True).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.engines
@pytest.mark.parametrize("engine", ("fsdp2", "zero3"))
def test_tied_head_full_finetuning(engine, tied_dir, ref_dir, tmp_path):
    """The head weight is also the embedding: gathered in two module calls, trained by both."""
    one = one_process(tmp_path, tied_dir, ref_dir, ("full", "sstoken@ema", "sstoken@ema!3"), "full")
    two = two_processes(tmp_path, tied_dir, ref_dir, ("full", "sstoken@ema", "sstoken@ema!resume"),
                        "full", engine)
    two["sstoken@ema!3"] = two.pop("sstoken@ema!resume")
    check_same(one, two, engine)


SHIM = '''import os, sys
sys.path.insert(0, {tests!r})
from engine_step import relabel_cpu_as_gpu
relabel_cpu_as_gpu()
'''
ENGINE_FLAGS = {
    "fsdp2": ["--fsdp", "full_shard", "--fsdp_config", json.dumps(
        {"version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": [engine_step.LAYER],
         "state_dict_type": "FULL_STATE_DICT"})],
    "zero2": ["--deepspeed", json.dumps({"zero_optimization": {"stage": 2}, **engine_step.DS_AUTO})],
    "zero3": ["--deepspeed", json.dumps({"zero_optimization": {"stage": 3}, **engine_step.DS_AUTO})],
}


@pytest.mark.engines
@pytest.mark.parametrize("launcher", ("torchrun", "accelerate"))
@pytest.mark.parametrize("engine", ("fsdp2", "zero2", "zero3"))
def test_the_command_line_under_every_engine(engine, launcher, tiny_dir, records, tmp_path):
    """`sstoken train` as users launch it: torchrun with --fsdp / --deepspeed, or `accelerate
    launch` with the shipped config (configs/accelerate/*.yaml). With the EMA history, a
    checkpoint every step and AdamW, the adapter, the checkpoint's EMA and selection.jsonl
    equal one process; resumed from checkpoint 1, the adapter too. (The shim is put in by a
    sitecustomize module, before the command starts.)"""
    from sstoken.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(8, seed=4, multi_turn=True)))
    common = ["--model", tiny_dir, "--data", str(data), "--method", "sstoken", "--history", "ema",
              "--lora_r", "4", "--lora_dropout", "0", "--max_steps", "2", "--save_scores", "8",
              "--learning_rate", "1e-2", "--seed", "1", "--save_strategy", "steps", "--save_steps", "1"]
    assert main(["train", *common, "--use_cpu", "true", "--per_device_train_batch_size", "4",
                 "--output_dir", str(tmp_path / "one")]) == 0
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM.format(tests=str(HERE)))
    env = {**os.environ, "PYTHONPATH": f"{shim}:{HERE.parent / 'src'}", "OMP_NUM_THREADS": "1"}

    def launch(*flags):
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(free_port()), "-m", "sstoken.cli", "train", *ENGINE_FLAGS[engine]]
        else:
            config = HERE.parent / "configs" / "accelerate" / f"{engine}.yaml"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "sstoken.cli",
                   "train"]
        cmd += [*common, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / engine), *flags]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]

    def same(name, a, b):
        x, y = load_file(str(tmp_path / a / name)), load_file(str(tmp_path / b / name))
        assert set(x) == set(y) and max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-5, name

    launch()
    same("adapter_model.safetensors", "one", engine)
    same("checkpoint-1/sstoken_ema.safetensors", "one", engine)
    keeps = [[json.loads(line)["keep"] for line in (tmp_path / run / "selection.jsonl").read_text().splitlines()]
             for run in ("one", engine)]
    assert len(keeps[1]) == 8 and keeps[0] == keeps[1]
    launch("--resume_from_checkpoint", str(tmp_path / engine / "checkpoint-1"))
    same("adapter_model.safetensors", "one", engine)

    from sstoken.args import parse
    from sstoken.runs import engine as engine_of

    # sstoken's refusals know the engine from the same flags (--deepspeed given as JSON text)
    assert engine_of(parse("train", ENGINE_FLAGS[engine])[4]) == \
        {"fsdp2": ("fsdp", 0), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}[engine]
