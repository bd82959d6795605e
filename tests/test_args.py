"""sstoken.args: one argument layer. Every problem reported at once, config files checked,
one set of defaults shared by the command line, config files, the sweep and the Python API."""
import dataclasses

import pytest
import yaml

from sstoken.args import (COMMANDS, TRAIN, DataArguments, SelectionArguments, TrainArguments, parse,
                          train_args_from)
from sstoken.cli import main
from sstoken.errors import UsageError


def test_every_problem_at_once():
    with pytest.raises(UsageError) as e:
        parse("train", ["--method", "nope", "--rho", "0", "--gamma", "2", "--lora_r", "0",
                        "--template", "x", "--max_seq_length", "0", "--attn_layer", "top"])
    text = str(e.value)
    for part in ("--method must be one of", "--rho must be", "--gamma must be", "--lora_r must be",
                 "--template must be", "--max_seq_length must be", "attn_layer"):
        assert part in text, part
    assert len(e.value.problems) == 7


def test_cli_prints_problems_without_traceback(capsys):
    assert main(["train", "--rho", "2", "--gamma", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--rho must be" in err and "--gamma must be" in err and "Traceback" not in err
    assert main(["nope"]) == 2
    with pytest.raises(UsageError):                  # --debug: the traceback, for bug reports
        main(["train", "--rho", "2", "--debug"])


@pytest.mark.parametrize("content, msg", [
    ("rho: [0.5]\n", "must be a single value"),
    ("rho: 0.5\n  bad: [\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("rhoo: 0.5\nlimt: 3\n", "unknown option(s) limt, rhoo"),
])
def test_bad_config_files_name_the_problem(tmp_path, content, msg):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parse("train", ["--config", str(cfg)])


def test_config_missing_file_or_value():
    with pytest.raises(UsageError, match="no such file"):
        parse("train", ["--config", "/nonexistent/x.yaml"])
    with pytest.raises(UsageError, match="needs a file name"):
        parse("train", ["--config"])


def test_one_set_of_defaults():
    """The command line with no flag, the Python API with no option and the bare dataclasses
    agree; they are the paper's setup."""
    cli = parse("train", [])
    api = train_args_from({})
    bare = tuple(t() for t in TRAIN)
    for a, b, c in zip(cli, api, bare):
        fa, fb, fc = (dataclasses.asdict(x) for x in (a, b, c))
        for k in fa:
            if k not in ("logging_dir",):
                assert fa[k] == fb[k] == fc[k], k
    m, f, d, s, t = cli
    assert (s.method, s.rho, s.gamma, s.attn_layer, f.lora_r, f.lora_alpha, f.lora_dropout) == \
        ("sstoken", 0.6, 0.5, "-1", 64, 16, 0.1)
    assert (t.learning_rate, t.num_train_epochs, t.warmup_steps, d.max_seq_length, d.template) == \
        (1e-4, 1.0, 0.03, 2048, "tulu")
    assert TrainArguments().learning_rate == 1e-4


def test_every_command_parses_its_defaults_and_has_help(capsys):
    for command in COMMANDS:
        if command in ("merge",):
            with pytest.raises(UsageError, match="--output is required"):
                parse(command, [])
        elif command in ("compare", "sweep"):
            with pytest.raises(UsageError):
                parse(command, [])
        else:
            parse(command, [])
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--config" in capsys.readouterr().out


def test_dashes_and_underscores_and_positionals(tmp_path):
    (d,) = [x for x in parse("score", ["--max-seq-length", "64"]) if isinstance(x, DataArguments)]
    assert d.max_seq_length == 64
    (c,) = parse("compare", ["a", "b", "--labels", "x,y"])
    assert c.inputs == ["a", "b"]


def test_sweep_spec_unknown_keys_are_named(tmp_path):
    from sstoken.sweep import check_spec

    with pytest.raises(UsageError) as e:
        check_spec({"base": {"lr": 1}, "grid": [{"method": "full", "rhoo": 0.5}],
                    "eval": {"limt": 100}, "seed": [0]}, "s.yaml")
    text = str(e.value)
    for part in ("unknown key 'seed'", "base.lr is not an option", "grid[0].rhoo", "eval.limt"):
        assert part in text, part
    with pytest.raises(UsageError, match="run sstoken-rho1.5-seed0: --rho must be"):
        check_spec({"grid": [{"method": "sstoken", "rho": 1.5}]}, "s.yaml")
    with pytest.raises(UsageError, match="eval.heldout takes"):
        check_spec({"eval": {"heldout": {"data": "d", "skip": 3}}}, "s.yaml")
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"grid": [{"method": "full"}], "eval": {"limt": 100}}))
    assert main(["sweep", str(p)]) == 2


def test_selection_arguments_in_python_report_all_problems():
    with pytest.raises(UsageError) as e:
        SelectionArguments(method="rho1", rho=0, tc_partitions=0)
    assert len(e.value.problems) == 3


def test_beyond_the_paper_options_are_checked():
    """--normalize, --attn_sink, --rho_rule, --learned_prob and --history epoch: bad values
    and combinations that would silently do nothing are refused, all at once."""
    with pytest.raises(UsageError) as e:
        SelectionArguments(method="sstoken", normalize="zscore", attn_sink=-1, rho_rule="auto",
                           learned_prob=1.0, history="moving")
    assert len(e.value.problems) == 5
    with pytest.raises(UsageError) as e:
        SelectionArguments(method="random", normalize="rank", attn_sink=1)
    assert [p.split(" ")[0] for p in e.value.problems] == ["--normalize", "--attn_sink"]
    for method in ("full", "tokencleaning"):
        with pytest.raises(UsageError, match=f"--method {method} has no per-step rho"):
            SelectionArguments(method=method, rho_rule="unlearned", ref_model="x")
    with pytest.raises(UsageError, match="--history epoch computes history losses online"):
        SelectionArguments(method="sstoken", history="epoch", history_losses="/")
    ok = SelectionArguments(method="random", rho_rule="unlearned")
    assert ok.rho_rule == "unlearned"
