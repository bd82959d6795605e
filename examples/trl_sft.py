"""ssToken inside a TRL script: the usual SFTTrainer setup with two names changed.

Runs offline on the embedded SmolLM2-135M-Instruct and GSM8K (a few minutes on CPU):

    .venv/bin/python examples/trl_sft.py                      # ssToken, LoRA r 64, 48 problems
    .venv/bin/python examples/trl_sft.py --method random --max_steps 4

Any TRL dataset works the same way: conversational ("messages", with assistant_only_loss) or
prompt-completion (completion_only_loss, TRL's default for it).
"""
import argparse

from datasets import Dataset
from peft import LoraConfig

from sstoken.embedded import EMBEDDED_MODEL, gsm8k_records, resolve_model
from sstoken.integrations.trl import SSTokenSFTConfig, SSTokenSFTTrainer   # was: SFTConfig, SFTTrainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL, help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--samples", type=int, default=48, help="GSM8K problems to train on")
    p.add_argument("--method", default="sstoken", help="full, random, rho1, tokencleaning or sstoken")
    p.add_argument("--max_steps", type=int, default=-1, help="stop after N steps (default: one epoch)")
    p.add_argument("--output_dir", default="outputs/trl-sstoken")
    a = p.parse_args()

    rows = [rec for _, rec in zip(range(a.samples), (r for _, r in gsm8k_records()))]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["completion"]} for r in rows])

    config = SSTokenSFTConfig(
        output_dir=a.output_dir, max_steps=a.max_steps, num_train_epochs=1, learning_rate=1e-4,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=256,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        method=a.method, rho=0.6, gamma=0.5,                    # the sstoken options
    )
    trainer = SSTokenSFTTrainer(
        model=resolve_model(a.model), args=config, train_dataset=dataset,
        peft_config=LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
    )
    trainer.train()
    trainer.save_model()
    trainer.save_state()           # trainer_state.json: the log, with the sel/* statistics
    logs = [h for h in trainer.state.log_history if "loss" in h]
    print(f"{a.method}: {len(logs)} steps, loss {logs[0]['loss']:.4f} -> {logs[-1]['loss']:.4f}, "
          f"kept {logs[-1]['sel/kept_frac']:.3f} of the completion tokens; outputs in {a.output_dir}")


if __name__ == "__main__":
    main()
