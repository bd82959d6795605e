"""The public Python API (the README's snippet): train, score and evaluate in a few lines,
with the same option names and defaults as the command line."""
import json

import pytest

import sstoken
from sstoken.errors import UsageError


def test_train_score_evaluate_from_python(tmp_path, tiny_dir, records):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(8)))
    cache = str(tmp_path / "cache")
    entry = sstoken.score(model=tiny_dir, data=str(data), cache_dir=cache)
    run = sstoken.train(model=tiny_dir, data=str(data), method="sstoken", rho=0.5, lora_r=4,
                        max_steps=2, per_device_train_batch_size=4, use_cpu=True, cache_dir=cache,
                        output_dir=str(tmp_path / "run"))
    assert run["steps"] == 2 and run["history_losses"] == "cache" and entry.is_dir()
    assert run["config"]["gamma"] == 0.5 and run["config"]["lora_alpha"] == 16    # paper defaults
    report = sstoken.evaluate(model=tiny_dir, adapter=run["output_dir"], tasks=[],
                              heldout={"data": str(data), "samples": 4},
                              output_dir=str(tmp_path / "ev"))
    assert report["results"]["heldout"]["loss"] > 0


def test_unknown_or_bad_options_fail_before_anything_loads():
    with pytest.raises(UsageError, match="unknown option.*learning_rat"):
        sstoken.train(learning_rat=1e-4)
    with pytest.raises(UsageError) as e:
        sstoken.train(model="/nonexistent", rho=3, gamma=-1)
    assert len(e.value.problems) == 2
    with pytest.raises(UsageError, match="unknown option"):
        sstoken.score(method="sstoken")
