"""sstoken.evaluation tables, plot and compare: best in bold, missing values, averages, seed
groups with paired differences, the PNG."""
import json
import math
from pathlib import Path

import pytest

from sstoken.evaluation import (is_loss, primary, cells_of, compare, load_eval, results_table,
                                with_average)
from sstoken.stats import seed_groups


from fake_scores import fake_eval_run as _fake_run  # noqa: E402


def test_compare_table_marks_best_and_plots(tmp_path):
    runs = [_fake_run(tmp_path / "a", 0.50, 0.02), _fake_run(tmp_path / "b", 0.55, 0.02)]
    res = compare(runs, tmp_path / "cmp")
    table = res["markdown"]
    assert table.splitlines()[0] == "| run | arc_easy (acc) | triviaqa (exact_match) | average |"
    assert "| b | **55.0 ± 2.0** | **27.5 ± 2.0** | **41.3** |" in table
    assert "| a | 50.0 ± 2.0 | 25.0 ± 2.0 | 37.5 |" in table
    assert Path(res["table"]).read_text() == table
    png = Path(res["plot"])
    assert png == tmp_path / "cmp" / "compare.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000
    assert not list((tmp_path / "cmp").glob(".*.tmp"))                 # atomic writes, cleaned up
    # eval.json paths and labels work too
    res = compare([str(Path(r) / "eval.json") for r in runs], tmp_path / "cmp2", labels=["x", "y"])
    assert "| y | **55.0 ± 2.0** |" in res["markdown"]
    with pytest.raises(ValueError, match="labels"):
        compare(runs, tmp_path / "cmp3", labels=["only-one"])
    with pytest.raises(FileNotFoundError, match="no eval.json"):
        compare([str(tmp_path)], tmp_path / "c2")
    with pytest.raises(TypeError):
        compare(runs, tmp_path / "c4", ["x", "y"])                       # labels: keyword only


def test_results_table_handles_missing_values():
    t = results_table([{"results": {"arc_easy": {"acc": 0.5, "acc_stderr": None}}},
                       {"results": {"mmlu": {"acc": 0.3, "acc_stderr": 0.1}}}], ["x", "y"])
    assert "| x | **50.0** | - | - |" in t                    # no average without every task
    assert "| y | - | **30.0 ± 10.0** | - |" in t


def test_cells_and_average_of_one_run(tmp_path):
    """What sweep's ablation plots read: cells in % (the loss in nats), the benchmark average."""
    d = tmp_path / "r"
    d.mkdir()
    (d / "eval.json").write_text(json.dumps({"results": {
        "arc_easy": {"acc": 0.5, "acc_stderr": "N/A"}, "mmlu": {"acc": 0.3, "acc_stderr": 0.01},
        "heldout": {"loss": 1.25, "loss_stderr": 0.02, "token_loss": 1.2, "token_loss_stderr": None}}}))
    (cells,), cols = with_average([cells_of(load_eval(d))])
    assert cols == ["arc_easy", "mmlu", "average", "heldout"]
    assert cells["arc_easy"] == (50.0, None) and cells["mmlu"] == pytest.approx((30.0, 1.0))
    assert cells["heldout"] == (1.25, 0.02) and cells["average"] == (pytest.approx(40.0), None)
    assert is_loss("heldout") and is_loss("heldout_chat") and not is_loss("hellaswag")
    assert primary("heldout") == primary("heldout_chat") == "loss" and primary("mmlu") == "acc"


def _seed_run(root: Path, name: str, acc: float, loss: float) -> str:
    d = root / name
    d.mkdir()
    (d / "eval.json").write_text(json.dumps({"results": {
        "arc_easy": {"acc": acc, "acc_stderr": 0.01},
        "heldout": {"loss": loss, "loss_stderr": 0.002, "token_loss": loss, "token_loss_stderr": None}}}))
    return str(d)


def test_compare_over_seeds_pairs_by_seed(tmp_path):
    import statistics

    from scipy.stats import t as student_t

    full = [(0.50, 1.00), (0.52, 1.10), (0.54, 1.20)]
    sst = [(0.55, 1.01), (0.58, 1.12), (0.57, 1.19)]
    runs = [_seed_run(tmp_path, "base", 0.40, 1.50)]
    runs += [_seed_run(tmp_path, f"full-seed{k}", *v) for k, v in enumerate(full)]
    runs += [_seed_run(tmp_path, f"sstoken-gamma0.5-seed{k}", *v) for k, v in enumerate(sst)]
    assert seed_groups([Path(r).name for r in runs]) == {
        "base": {-1: 0}, "full": {0: 1, 1: 2, 2: 3}, "sstoken-gamma0.5": {0: 4, 1: 5, 2: 6}}
    md = compare(runs, tmp_path / "cmp")["markdown"]
    # the loss column is in nats, lower is better, and not part of the average
    assert "| run (n) | arc_easy (acc) | average | heldout (loss, lower is better) |" in md
    se_full = statistics.stdev([52.0 - 2, 52.0, 52.0 + 2]) / math.sqrt(3)
    assert f"| full (3) | 52.0 ± {se_full:.1f} | 52.0 ± {se_full:.1f} | **1.1000 ± 0.0577** |" in md
    assert "| base (1) | 40.0 | 40.0 | 1.5000 |" in md                   # one run: no stderr over seeds
    assert "| sstoken-gamma0.5 (3) | **56.7 ± 0.9** | **56.7 ± 0.9** | 1.1067 ± 0.0524 |" in md
    diffs = [5.0, 6.0, 3.0]                                      # sstoken - full per seed, points
    m, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(3)
    h = student_t.ppf(0.975, 2) * se
    assert f"**{m:+.1f} ± {se:.1f} [{m - h:+.1f}, {m + h:+.1f}]**" in md     # excludes 0: bold
    dl = [0.01, 0.02, -0.01]
    ml, sel = statistics.mean(dl), statistics.stdev(dl) / math.sqrt(3)
    hl = student_t.ppf(0.975, 2) * sel
    assert f"| {ml:+.4f} ± {sel:.4f} [{ml - hl:+.4f}, {ml + hl:+.4f}] |" in md  # includes 0: plain
    assert "| base |" not in md.split("Difference to full")[1].split("Every run")[0]  # nothing to pair
    assert "Every run:" in md and "| full-seed1 | 52.0 ± 1.0 |" in md
    assert Path(tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # no baseline group: means only
    md2 = compare(runs, tmp_path / "cmp2", baseline="nope")["markdown"]
    assert "Difference to" not in md2 and "| full (3) |" in md2
    with pytest.raises(ValueError, match="two runs named"):
        seed_groups(["a-seed0", "a-seed0"])
