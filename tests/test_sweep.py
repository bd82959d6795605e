"""sstoken.sweep: grid expansion (seeds outermost), a tiny sweep end to end (scored once,
evaluated with the held-out loss, compared), and resuming without redoing finished runs."""
import json

import pytest
import yaml

from sstoken.errors import UsageError


def test_sweep_expansion_and_resume(tmp_path, tiny_dir, records):
    from sstoken.sweep import expand, run_sweep

    spec = {"grid": [{"method": "full"}, {"method": "sstoken", "gamma": [0.0, 1.0]}], "seeds": [0, 1]}
    names = [r["name"] for r in expand(spec)]
    assert names == ["full-seed0", "sstoken-gamma0.0-seed0", "sstoken-gamma1.0-seed0",
                     "full-seed1", "sstoken-gamma0.0-seed1", "sstoken-gamma1.0-seed1"]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(6)))
    cfg = {"output_dir": str(tmp_path / "sw"),
           "base": {"model": tiny_dir, "data": str(data), "lora_r": 4, "max_steps": 1, "use_cpu": True,
                    "per_device_train_batch_size": 3, "cache_dir": str(tmp_path / "cache")},
           "grid": [{"method": "full"}, {"method": "sstoken", "gamma": [0.5]}], "seeds": [0],
           "eval": {"preset": "offline", "tasks": ["arc_easy"], "limit": 2, "batch_size": 2,
                    "heldout": {"data": str(data), "skip_samples": 4, "max_samples": 2},
                    "benchmark_seeds": [1]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    res = run_sweep(str(tmp_path / "s.yaml"))
    assert len(res["runs"]) == 3                                 # base + 2 runs
    table = (tmp_path / "sw" / "compare" / "compare.md").read_text()
    assert "| base |" in table and "| sstoken-gamma0.5-seed0 |" in table
    assert "heldout (loss, lower is better)" in table
    ev = json.loads((tmp_path / "sw" / "runs" / "full-seed0" / "eval.json").read_text())
    assert ev["heldout"]["documents"] == 2 and ev["heldout"]["skip"] == 4 and ev["results"]["heldout"]["loss"] > 0
    assert set(ev["results"]) == {"heldout"}                     # seed 0 is not a benchmark seed
    base_ev = json.loads((tmp_path / "sw" / "runs" / "base" / "eval.json").read_text())
    assert set(base_ev["results"]) == {"arc_easy", "heldout"}    # the base model gets everything
    s = json.loads((tmp_path / "sw" / "runs" / "sstoken-gamma0.5-seed0" / "sstoken_run.json").read_text())
    assert s["history_losses"] == "cache"                        # scored once, found by the run
    assert res["report"] and "sstoken-gamma0.5-seed0" in (tmp_path / "sw" / "report.html").read_text()
    mtime = (tmp_path / "sw" / "runs" / "full-seed0" / "sstoken_run.json").stat().st_mtime_ns
    run_sweep(str(tmp_path / "s.yaml"))                          # resumed: nothing is redone
    assert (tmp_path / "sw" / "runs" / "full-seed0" / "sstoken_run.json").stat().st_mtime_ns == mtime


def test_weightings_get_their_own_run_names():
    from sstoken.sweep import check_spec, expand

    spec = {"grid": [{"method": "full"}, {"method": "full", "weighting": ["dft", "asft"]},
                     {"method": "sstoken", "weighting": "dft"}], "seeds": [0]}
    assert [r["name"] for r in expand(check_spec(spec, "s.yaml"))] == \
        ["full-seed0", "full-weightingdft-seed0", "full-weightingasft-seed0", "sstoken-weightingdft-seed0"]


def test_beyond_the_paper_options_are_named_and_several_heldout_sets(tmp_path, tiny_dir, records):
    """Runs that set --normalize / --attn_sink / --rho_rule / --history say so in their names;
    eval.heldout may name several sets, each its own task heldout_<name> in eval.json and in
    the comparison table."""
    from sstoken.sweep import check_spec, expand, run_sweep

    spec = {"grid": [{"method": "sstoken", "normalize": "rank"}, {"method": "sstoken", "attn_sink": 1},
                     {"method": "sstoken", "rho_rule": "unlearned"}, {"method": "sstoken", "history": "epoch"}]}
    assert [r["name"] for r in expand(check_spec(spec, "s.yaml"))] == \
        ["sstoken-normalizerank-seed0", "sstoken-attn_sink1-seed0", "sstoken-rho_ruleunlearned-seed0",
         "sstoken-historyepoch-seed0"]
    with pytest.raises(UsageError, match=r"eval.heldout.b takes"):
        check_spec({"eval": {"heldout": {"a": {"data": "x"}, "b": {"skip_samples": 1}}}}, "s.yaml")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(8)))
    cfg = {"output_dir": str(tmp_path / "sw"),
           "base": {"model": tiny_dir, "data": str(data), "lora_r": 4, "max_steps": 1, "use_cpu": True,
                    "per_device_train_batch_size": 3, "cache_dir": str(tmp_path / "cache")},
           "grid": [{"method": "full"}],
           "eval": {"tasks": [], "include_base": False,
                    "heldout": {"a": {"data": str(data), "skip_samples": 4, "max_samples": 2},
                                "b": {"data": str(data), "skip_samples": 6, "max_samples": 2}}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    run_sweep(str(tmp_path / "s.yaml"))
    ev = json.loads((tmp_path / "sw" / "runs" / "full-seed0" / "eval.json").read_text())
    assert set(ev["results"]) == {"heldout_a", "heldout_b"}
    assert ev["heldout"]["heldout_b"]["skip"] == 6
    assert ev["results"]["heldout_a"]["loss"] != ev["results"]["heldout_b"]["loss"]
    table = (tmp_path / "sw" / "compare" / "compare.md").read_text()
    assert "heldout_a (loss, lower is better)" in table and "heldout_b (loss" in table
