"""Tests for config.py: where a run's values come from. A typed flag wins, then the --phase row, the training
row (laptop or paper, by model and data), the data row; a paper-size model takes the paper's values and is
refused on laptop data with one line."""

import ast
from pathlib import Path

import pytest

import config
import flow_matching
import train

ROOT = Path(__file__).resolve().parent.parent
IMAGENET = ["--data", "imagenet", "--data-path", "latents.npy"]


def test_xl2_on_imagenet_takes_the_papers_values():
    args = train.parse_args(["--model", "XL/2", *IMAGENET])
    assert (args.lr, args.g_lr, args.batch_size) == (1e-4, 1e-4, 256)
    assert (args.ema_decay, args.ema_warmup) == (0.9999, 0)
    assert (args.ot_start, args.ot_end, args.ot_decay_steps) == (0.2, 0.005, 500_000)
    assert (args.gp_scale, args.prior, args.augment_p, args.max_steps) == (0.25, "standard", 0.0, 1_000_000)
    train.validate(args, world_size=8)
    config.check_model_and_data(args)  # nothing to say
    deep = train.parse_args(["--model", "XL/2", "--repeat", "4", *IMAGENET])
    assert (deep.lr, deep.g_lr, deep.grad_clip) == (1e-4, 2.5e-5, 5.0)


@pytest.mark.parametrize("argv, words", [
    (["--model", "XL/2"], ["--model XL/2 is a paper-size model", "--data imagenet --data-path", "T/7"]),
    (["--model", "B/2", "--data", "cifar10"], ["--model B/2 is a paper-size model", "on cifar10"]),
    (["--model", "XL/2", "--data", "imagenet"], ["--data imagenet needs --data-path"]),
])
def test_a_paper_size_model_without_imagenet_data_says_what_to_give(argv, words, tmp_path, capsys):
    """`torchrun train.py --model XL/2` used to train XL/2 on Fashion-MNIST with the laptop row."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(word in err[0] for word in words), err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_laptop_model_on_laptop_data_takes_the_laptop_row():
    args = train.parse_args([])
    assert (args.model, args.image_size, args.flip, args.judge_every) == ("T/7", 28, False, 250)  # data
    assert (args.batch_size, args.lr, args.g_lr) == (32, 2e-3, 1e-3)
    assert (args.ema_decay, args.ema_warmup, args.prior) == (0.99, 10, "data")
    assert (args.ot_start, args.ot_end, args.gp_scale, args.augment_p) == (0.1, 0.1, 0.05, 1.0)
    assert (args.cp_scale, args.gp_eps, args.weight_decay, args.grad_clip) == (0.01, 0.01, 0.01, 50.0)
    assert train.parse_args(["--model", "T/4", "--data", "cifar10"]).lr == 2e-3
    two_step = train.parse_args(["--nfe", "2"])
    assert (two_step.pred, two_step.grad_clip, two_step.ot_start) == ("v", 5.0, 0.1)  # paper's 2-NFE, laptop


def test_a_laptop_model_on_imagenet_takes_the_papers_row():
    args = train.parse_args(["--model", "T/2", *IMAGENET])
    assert (args.batch_size, args.lr, args.prior, args.image_size) == (256, 1e-4, "standard", 256)


def test_typed_over_phase_over_training_row_over_data_row():
    args = train.parse_args(["--phase", "2", "--model", "T/4", "--data", "cifar10", "--lr", "1e-5"])
    source = args.sources
    assert (args.lr, source["lr"]) == (1e-5, "typed")
    assert (args.ot_start, args.prior, source["ot_start"]) == (0.001, "standard", "--phase 2")
    assert (args.batch_size, source["batch_size"]) == (32, "laptop row")
    assert (args.flip, source["flip"]) == (True, "cifar10 row")
    assert args.g_lr == 1e-5  # the phase leaves G's rate to follow D's: --lr / --repeat
    assert config.describe_sources({"lr": "typed", "flip": "cifar10 row", "seed": "typed"}) == \
        "typed: lr, seed; cifar10 row: flip"


@pytest.mark.parametrize("paper, laptop, parser", [
    (config.paper_row(1, 1), config.LAPTOP, train.parse_args),
    (flow_matching.PAPER, flow_matching.LAPTOP, flow_matching.parse_args),
])
def test_rows_are_flags_and_set_each_value_once(paper, laptop, parser):
    """The laptop row departs from the paper's row (no knob of its own), the data rows set what the training
    rows do not, and every value of every row is a flag of the script."""
    flags = set(vars(parser([])))
    data_keys = set().union(*config.DATA.values())
    assert set(laptop) <= set(paper) <= flags and data_keys <= flags
    assert not data_keys & set(paper)
    assert all(laptop[name] != paper[name] for name in laptop if name != "ot_decay_steps")  # a departure
    for phase in config.TABLE_11:
        assert set(config.phase_row(phase, 1, 1, "XL/2")) <= set(config.paper_row(1, 1))


def test_help_shows_the_values_a_run_takes(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(paper 0.0001; laptop 0.002)", "(paper 256; laptop 32)", "(paper standard; laptop data)",
                  "fashion-mnist 28", "imagenet 256"):
        assert shown in text, shown


def test_train_py_and_flow_matching_py_stay_readable():
    """train.py at most 450 lines, flow_matching.py at most 200, and no function longer than 70 lines."""
    limits = {"train.py": 450, "flow_matching.py": 200, "config.py": 300}
    for name, limit in limits.items():
        source = (ROOT / name).read_text()
        assert len(source.splitlines()) <= limit, name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 70, f"{name}: {node.name}"
