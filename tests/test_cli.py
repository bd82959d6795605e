"""The command line end to end on the tiny model: config + flags, train, merge, score, help."""
import json
import math
from fractions import Fraction

import pytest
import torch
import yaml

from sstoken.args import parse
from sstoken.cli import main
from sstoken.errors import UsageError


def parse_train_args(argv):
    return parse("train", argv)


def write_data(tmp_path, records, n=6):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in records(n, multi_turn=True)))
    return str(p)


def test_yaml_config_and_flag_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"method": "sstoken", "rho": 0.5, "gamma": 0.3,
                                   "learning_rate": 3e-4, "output_dir": str(tmp_path / "o")}))
    m, f, d, s, t = parse_train_args(["--config", str(cfg), "--rho", "0.7"])
    assert (s.method, s.rho, s.gamma, t.learning_rate) == ("sstoken", 0.7, 0.3, 3e-4)
    assert f.lora_r == 64 and f.lora_alpha == 16 and d.template == "tulu"
    cfg.write_text(yaml.safe_dump({"rhoo": 0.5}))
    with pytest.raises(UsageError, match="unknown option"):
        parse_train_args(["--config", str(cfg)])


def test_paper_config_parses():
    from pathlib import Path

    m, f, d, s, t = parse_train_args(["--config", str(Path(__file__).parents[1] / "configs" / "paper.yaml"), "--bf16", "false"])
    assert (s.method, s.rho, s.gamma, s.rel_warmup, f.lora_r, d.max_seq_length) == \
        ("sstoken", 0.6, 0.5, 0.2, 64, 2048)


@pytest.mark.parametrize("bad, msg", [(["--method", "nope"], "method must be"),
                                      (["--rho", "0"], "rho must be"),
                                      (["--method", "rho1"], "needs --ref_model")])
def test_bad_options_are_explained(bad, msg):
    with pytest.raises(UsageError, match=msg):
        parse_train_args(bad)


def test_help_explains_every_subcommand(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for cmd in ("train", "score", "merge", "demo", "train-ref", "eval", "compare", "show", "sweep"):
        assert f"  {cmd} " in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--gamma" in out and "Eq. 9" in out and "--learning_rate" in out


def test_train_lora_then_merge_round_trip(tmp_path, tiny_dir, records):
    data = write_data(tmp_path, records)
    out = tmp_path / "run"
    rc = main(["train", "--model", tiny_dir, "--data", data, "--method", "sstoken",
               "--lora_r", "4", "--max_steps", "2", "--per_device_train_batch_size", "3",
               "--output_dir", str(out), "--use_cpu", "true", "--save_scores", "3"])
    assert rc == 0
    summary = json.loads((out / "sstoken_run.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "sstoken"
    assert (out / "adapter_model.safetensors").exists() and (out / "selection.jsonl").exists()
    assert main(["merge", "--model", tiny_dir, "--adapter", str(out), "--output", str(tmp_path / "m")]) == 0
    from peft import PeftModel

    from sstoken.modeling import load_model

    ids = torch.randint(5, 300, (2, 11))
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(load_model(tiny_dir, "float32"), str(out)).eval()
        merged = load_model(str(tmp_path / "m"), "float32").eval()
        a, b = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        base = load_model(tiny_dir, "float32")(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - base).abs().max() > 1e-6                   # the adapter did change the model


def test_full_finetune_and_rho1_with_score_cache(tmp_path, tiny_dir, records):
    data = write_data(tmp_path, records)
    common = ["--data", data, "--max_steps", "1", "--per_device_train_batch_size", "6",
              "--use_cpu", "true", "--cache_dir", str(tmp_path / "cache")]
    assert main(["score", "--model", tiny_dir, "--data", data, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert main(["train", "--model", tiny_dir, "--finetune", "full", "--method", "rho1",
                 "--ref_model", tiny_dir, "--output_dir", str(tmp_path / "r"), *common]) == 0
    s = json.loads((tmp_path / "r" / "sstoken_run.json").read_text())
    assert s["kept_frac"][0] < 1.0
    # sstoken finds the cached base losses instead of computing them online
    assert main(["train", "--model", tiny_dir, "--finetune", "full", "--method", "sstoken",
                 "--output_dir", str(tmp_path / "s"), *common]) == 0
    s = json.loads((tmp_path / "s" / "sstoken_run.json").read_text())
    assert s["history_losses"] == "cache"


def test_tokencleaning_self_evolving_rounds(tmp_path, tiny_dir, records):
    data = write_data(tmp_path, records, n=9)
    assert main(["train", "--model", tiny_dir, "--method", "tokencleaning", "--tc_mode",
                 "self_evolving", "--tc_partitions", "3", "--lora_r", "4",
                 "--data", data, "--per_device_train_batch_size", "3", "--use_cpu", "true",
                 "--output_dir", str(tmp_path / "tc"), "--cache_dir", str(tmp_path / "cache")]) == 0
    s = json.loads((tmp_path / "tc" / "sstoken_run.json").read_text())
    rounds = s["rounds"]
    ids = [r for rd in rounds for r in rd["examples"]]
    assert len(rounds) == 3 and ids == [f"ex{k}" for k in range(9)]      # contiguous, in order
    assert rounds[0]["kept_tokens"] == rounds[0]["response_tokens"]      # round 0: all tokens
    for rd in rounds[1:]:                                                # then global floor(rho N)
        assert rd["kept_tokens"] == math.floor(Fraction("0.6") * rd["response_tokens"])
    assert 0 < s["kept_frac"][-1] < 1


def test_train_ref_writes_a_loadable_reference(tmp_path, tiny_dir, records):
    data = write_data(tmp_path, records, n=4)
    assert main(["train-ref", "--model", tiny_dir, "--data", data, "--lora_r", "4", "--max_steps", "1",
                 "--use_cpu", "true", "--output_dir", str(tmp_path / "ref")]) == 0
    from sstoken.modeling import load_model

    assert load_model(str(tmp_path / "ref" / "merged"), "float32") is not None
    s = json.loads((tmp_path / "ref" / "sstoken_run.json").read_text())
    assert s["method"] == "full"
