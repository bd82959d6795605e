"""The benchmark script runs end to end on the tiny model (CPU smoke; no timing asserted)."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def test_bench_tiny_smoke(tmp_path, monkeypatch):
    import bench

    from sstoken import history

    calls = []
    for cls, label in ((history.BaseHistory, "base"), (history.EMAHistory, "ema")):
        monkeypatch.setattr(cls, "losses", lambda self, *a, _real=cls.losses, _label=label, **k:
                            calls.append(_label) or _real(self, *a, **k))

    res = bench.main(["--shape", "tiny", "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "32", "--rounds", "2",
                      "--out", str(tmp_path / "B.md"), "--profile", str(tmp_path / "prof.txt")])
    names = [r["variant"] for r in res["steps"]]
    assert names[:2] == ["full (naive: full fp32 logits)", "full"] and len(names) == 19
    assert "full + eaft (naive: full fp32 logits)" in names and "sstoken (cached history) + dft" in names
    assert all(r["median_s"] > 0 and r["tokens_per_s"] > 0 for r in res["steps"])
    assert all(set(r["phases_s"]) == set(bench.PHASES) for r in res["steps"])
    # the split step runs the history forward once per step and round: online (2 timed + 1
    # profiled, in the first round only), EMA (2), epoch (2: its losses are the EMA's swap)
    assert sorted(calls) == ["base"] * 3 + ["ema"] * 4
    assert "sstoken (cached history) --normalize rank" in names and "sstoken (epoch history)" in names
    assert all(r["rounds"] == 2 for r in res["steps"])
    att = res["attention"]["32"]["fused SDPA, indicator value"]
    assert att["max_abs_err_vs_eager"] < 1e-5
    text = (tmp_path / "B.md").read_text()
    assert "| sstoken (online history) |" in text and "command:" in text
    assert "| variant | history forward | forward + selection | backward | optimizer |" in text
    prof = (tmp_path / "prof.txt").read_text()
    assert [line for line in prof.splitlines() if line.startswith("# ")] == \
        [f"# {n}: one training step under the profiler, top 30 ops by self_cpu_time_total" for n in bench.PROFILED]
    assert "aten::mm" in prof



def test_bench_rejects_an_unwritable_output_before_running(tmp_path, capsys):
    import bench

    (tmp_path / "file").write_text("x")
    for argv, msg in ((["--profile", str(tmp_path / "file" / "p.txt")], "--profile .*cannot create its folder"),
                      (["--json", str(tmp_path)], "--json .*not a writable file")):
        with pytest.raises(SystemExit):
            bench.main(["--shape", "tiny", *argv])
        assert re.search(msg, capsys.readouterr().err)


def test_bench_variant_filter(tmp_path):
    import bench

    res = bench.main(["--shape", "tiny", "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "16",
                      "--variants", "eaft", "--out", str(tmp_path / "B.md")])
    assert [r["variant"] for r in res["steps"]] == ["full", "full + eaft", "full + eaft (naive: full fp32 logits)"]
