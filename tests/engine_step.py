"""A few optimizer steps of SelectionTrainer under an engine, on CPU processes with gloo;
saves the trained weights, gathered whole. One step; two for sstoken and ``+unlearned``;
three with ``!3``, and with ``!resume`` the same three stopped after step 1 and resumed from
its checkpoint in a new trainer.

    torchrun --nproc_per_node 2 tests/engine_step.py OUT MODEL METHODS PER_DEVICE ACCUM FINETUNE ENGINE REF

ENGINE: ``ddp``, ``fsdp2`` (accelerate's FSDP2 wrapping, ``reshard_after_forward=True``),
``zero2`` or ``zero3`` (DeepSpeed through accelerate). METHODS as in ``ddp_step.py``, plus
``sstoken@cached`` (history losses from the loss cache), ``sstoken@ema`` and ``sstoken@epoch``.
REF: the reference model of rho1 and tokencleaning, and the scorer of ``@cached``.

TEST SHIM (not a product path). accelerate chooses FSDP and DeepSpeed only when the process
group's backend belongs to an accelerator (CUDA, XPU, ...); on CPU it always runs plain
multi-CPU DDP. :func:`relabel_cpu_as_gpu` changes only that label: the backend stays gloo
and the device stays the CPU, so accelerate's own FSDP2 wrapping and DeepSpeed's own ZeRO
engine (with its CPU accelerator) run unchanged. On GPUs users launch normally.
"""
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_records  # noqa: E402

LAYER = "LlamaDecoderLayer"
# A DeepSpeed config that takes its sizes from the Trainer's arguments
DS_AUTO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}


def relabel_cpu_as_gpu() -> None:
    """TEST SHIM: report a torchrun CPU/gloo launch as a multi-GPU one (device: CPU)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    def set_device(self):
        self.device = torch.device("cpu")

    PartialState._prepare_backend = _prepare_backend
    PartialState.set_device = set_device


def engine_args(engine: str, momentum: float = 0.0) -> dict:
    """The TrainingArguments that select ``engine`` (as the shipped accelerate configs do),
    with plain SGD (and ``momentum``)."""
    sgd = {"optim": "sgd", "optim_args": f"momentum={momentum}"}
    if engine == "ddp":
        return {"use_cpu": True, **sgd}
    if engine == "fsdp2":
        return {**sgd, "fsdp": "full_shard", "fsdp_config": {
            "version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": [LAYER],
            "state_dict_type": "FULL_STATE_DICT"}}
    stage = int(engine[-1])
    return {"deepspeed": {"zero_optimization": {"stage": stage}, **DS_AUTO,
                          "optimizer": {"type": "SGD", "params": {"lr": "auto", "momentum": momentum}}}}


def full_params(trainer, model) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole (gathered from the shards), on every rank."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out = {}
    for n, p in trainer.model_wrapped.named_parameters():
        key = n.removeprefix("module.").removeprefix("_fsdp_wrapped_module.")
        if hasattr(p, "ds_id"):                                  # ZeRO-3: gather the partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                t = p.detach().clone()
        elif type(p).__name__ == "DTensor":
            t = p.full_tensor().detach().clone()
        else:
            t = p.detach().clone()
        out[key] = t.contiguous()
    return {n: out[n] for n in names}


def main(out: str, model_dir: str, method: str, per_device: int, accum: int, finetune: str, engine: str,
         ref_dir: str | None = None):
    from transformers import TrainingArguments

    from sstoken.args import DataArguments, FinetuneArguments, ModelArguments, SelectionArguments
    from sstoken.data import build_examples
    from sstoken.losses import LossProvider
    from sstoken.methods import get_method
    from sstoken.modeling import load_tokenizer
    from sstoken.runs import train_once, build_model

    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    recs = make_records(8, seed=3, multi_turn=True)
    examples, _ = build_examples(((f"r{k}", r) for k, r in enumerate(recs)), tok)
    model_args = ModelArguments(model=model_dir, dtype="float32", loss_chunk_size=8)   # many chunks
    finetune_args = FinetuneArguments(finetune=finetune, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    method, _, run = method.partition("!")                # e.g. sstoken@ema!resume
    method, _, history = method.partition("@")            # e.g. sstoken@ema
    method, _, rule = method.partition("+")               # e.g. sstoken+unlearned
    method, _, weighting = method.partition(":")          # e.g. sstoken:dft
    sel = SelectionArguments(method=method, rho=0.6, gamma=0.5, save_scores=0,
                             weighting=weighting or "none", rho_rule=rule or "fixed",
                             history="base" if history in ("", "cached") else history, ema_alpha=0.5,
                             history_losses="auto" if history == "cached" else "online",
                             ref_model=ref_dir)
    steps = 2 if rule or method == "sstoken" else 1     # sstoken: step 2's REL is not 0
    if run:                                             # "!3": 3 steps; "!resume": the same 3
        steps = 3                                       # steps, stopped and resumed after step 1

    def arguments(max_steps, save):
        return TrainingArguments(
            output_dir=out + ".run", per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accum, max_steps=max_steps, learning_rate=0.5,
            lr_scheduler_type="constant", report_to="none",
            remove_unused_columns=False, save_strategy="steps" if save else "no", save_steps=1,
            logging_steps=1, seed=0, disable_tqdm=True, max_grad_norm=0.0,
            # with momentum the optimizer has a state to save (torch cannot load FSDP2's full
            # optimizer state dict of a stateless optimizer: "Expected device to be set")
            **engine_args(engine, momentum=0.5 if run else 0.0))

    args = arguments(1 if run == "resume" else steps, run == "resume")
    # As in `sstoken train`, the engine's arguments exist before the losses scored ahead of
    # training (rho1's and tokencleaning's reference, the cached base history): one rank
    # scores into the shared loss cache, the other waits and reads it.
    losses = LossProvider(model_args, DataArguments(data="engine_step", cache_dir=out + ".cache"))
    if history == "cached":
        # History losses from the cache, scored by REF: at step 1 the base model IS the
        # model being trained, so base-model REL would be rounding noise (1e-9) that min-max
        # normalization blows up, and no two batch layouts would select alike.
        losses.attach(ref_dir, examples, "history_loss")
    get_method(sel).prepare(examples, losses)
    model = build_model(model_args, finetune_args, seed=0)
    trainer = train_once(model, tok, examples, model_args, sel, args, Path(out + ".run"))
    if run == "resume":                  # a new process would do the same: new model, new trainer
        args = replace(arguments(steps, False), resume_from_checkpoint=out + ".run/checkpoint-1")
        model = build_model(model_args, finetune_args, seed=0)
        trainer = train_once(model, tok, examples, model_args, sel, args, Path(out + ".run"))
    wrapped = type(trainer.model_wrapped).__name__
    live = list(trainer.model_wrapped.parameters())
    seen = {"ddp": ("DistributedDataParallel" in wrapped) == (int(os.environ.get("WORLD_SIZE", "1")) > 1),
            "fsdp2": all(type(p).__name__ == "DTensor" for p in live),
            "zero2": wrapped == "DeepSpeedEngine" and not any(hasattr(p, "ds_id") for p in live),
            "zero3": wrapped == "DeepSpeedEngine" and all(hasattr(p, "ds_id") for p in live)}[engine]
    assert seen, f"{engine} did not run: the model is a {wrapped}"
    params = full_params(trainer, model)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file(params, out)
        json.dump(trainer.state.log_history, open(out + ".json", "w"))


if __name__ == "__main__":
    engine = sys.argv[7] if len(sys.argv) > 7 else "ddp"
    if engine != "ddp":
        relabel_cpu_as_gpu()
    ref = sys.argv[8] if len(sys.argv) > 8 else None
    for m in sys.argv[3].split(","):
        main(f"{sys.argv[1]}.{m}.st", sys.argv[2], m, int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], engine, ref)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Every output is written. Skip the interpreter's teardown: about one run in twenty, a
    # gloo/DeepSpeed helper thread still joinable at exit aborts it ("terminate called without
    # an active exception"), after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
