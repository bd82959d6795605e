"""One optimizer step of SelectionTrainer on 8 fixed examples; saves the trainable weights.
(Two steps for ``method+unlearned``: ``--rho_rule unlearned`` sets step 2's rho from step 1.)

Run directly (one process) or under ``torchrun --nproc_per_node 2``. Used by
tests/test_trainer.py to check that gradient accumulation and data parallelism give the same
update as one big batch.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_records  # noqa: E402


def main(out: str, model_dir: str, method: str, per_device: int, accum: int, finetune: str):
    from transformers import TrainingArguments

    from sstoken.args import FinetuneArguments, ModelArguments, SelectionArguments
    from sstoken.data import build_examples
    from sstoken.modeling import load_tokenizer
    from sstoken.runs import train_once, build_model

    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    recs = make_records(8, seed=3, multi_turn=True)
    examples, _ = build_examples(((f"r{k}", r) for k, r in enumerate(recs)), tok)
    model_args = ModelArguments(model=model_dir, dtype="float32")
    finetune_args = FinetuneArguments(finetune=finetune, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    method, _, rule = method.partition("+")               # e.g. sstoken+unlearned
    method, _, weighting = method.partition(":")          # e.g. sstoken:dft
    sel = SelectionArguments(method=method, rho=0.6, gamma=0.5, save_scores=0,
                             weighting=weighting or "none", rho_rule=rule or "fixed")
    args = TrainingArguments(output_dir=out + ".run", per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accum, max_steps=2 if rule else 1, learning_rate=0.5,
                             optim="sgd", lr_scheduler_type="constant", report_to="none",
                             remove_unused_columns=False, save_strategy="no", logging_steps=1,
                             use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=0.0)
    model = build_model(model_args, finetune_args, seed=0)
    trainer = train_once(model, tok, examples, model_args, sel, args, __import__("pathlib").Path(out + ".run"))
    if int(os.environ.get("RANK", "0")) == 0:
        params = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(params, out)
        json.dump(trainer.state.log_history, open(out + ".json", "w"))


if __name__ == "__main__":
    # out_prefix model_dir methods(comma-separated) per_device accum finetune
    for m in sys.argv[3].split(","):
        main(f"{sys.argv[1]}.{m}.st", sys.argv[2], m, int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
