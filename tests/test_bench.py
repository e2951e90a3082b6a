"""bench.py: the command runs each mode and reports complete, sane JSON; the baseline computes
train.py's objective.

Nothing here asserts speed. The command-line runs start together (one thread each) to keep the file fast.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import authors_step
import bench
import losses
import train

# in-process tests; the command lines get OMP_NUM_THREADS=1
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "T/4", "--image-size", "16", "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--device", "cpu"]
RUNS = {
    "plain": [],
    "baseline": ["--baseline"],
    "nfe2_latents": ["--nfe", "2", "--data-loader", "--in-channels", "4", "--image-size", "8",
                     "--num-workers", "1"],
    "pngs": ["--data-loader", "--num-workers", "1"],
}
REQUIRED = ["iter_ms", "img_per_s", "gflop_per_iter", "flop_units", "gflops", "tflops", "mm_fp32_gflops",
            "mm_fraction", "peak_mem_mb", "warmup_s", "sample_ms"]
BASELINE = ["baseline_iter_ms", "baseline_img_per_s", "baseline_gflop_per_iter", "baseline_flop_units",
            "baseline_tflops", "baseline_peak_mem_mb", "ratio"]
CONFIG = ["model", "batch_size", "precision", "compile", "nfe", "repeat", "device", "torch", "threads"]


@pytest.fixture(scope="module")
def results():
    """name -> (exit code, stdout, stderr) of `python bench.py TINY + RUNS[name]`, all started at once."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, "bench.py", *TINY, *extra], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, extra in RUNS.items()}
    outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
    return {name: (procs[name].returncode, *outputs[name]) for name in RUNS}


def report(results, name):
    code, out, err = results[name]
    assert code == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    for key in REQUIRED:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, result)
    for key in CONFIG:
        assert key in result, key
    return result


def test_reports_every_field(results):
    result = report(results, "plain")
    assert result["model"] == "T/4" and result["batch_size"] == 4 and result["nfe"] == 1
    assert result["device"] == "cpu" and result["threads"] == 1 and result["data_loader"] is False
    assert result["sample_nfe"] == 1
    assert result["img_per_s"] == pytest.approx(4 / (result["iter_ms"] / 1e3))
    assert result["tflops"] == pytest.approx(result["gflop_per_iter"] / result["iter_ms"])
    assert "ratio" not in result and "mfu" not in result  # no baseline asked; mfu is CUDA's


def test_baseline_adds_ratio(results):
    result = report(results, "baseline")
    for key in BASELINE:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["iter_ms"] / result["baseline_iter_ms"])
    baseline_tflops = result["baseline_gflop_per_iter"] / result["baseline_iter_ms"]  # GFLOP / ms = TFLOP / s
    assert result["baseline_tflops"] == pytest.approx(baseline_tflops)
    assert "baseline_mfu" not in result  # CUDA only, as mfu


def test_multi_step_from_latent_files(results):
    result = report(results, "nfe2_latents")
    assert result["nfe"] == 2 and result["sample_nfe"] == 2
    assert result["in_channels"] == 4 and result["data_loader"] is True


def test_data_loader_over_png_folders(results):
    assert report(results, "pngs")["data_loader"] is True


def test_bad_model_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "Q/9", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: unknown model 'Q/9'; valid models: "
                                                            + ", ".join(train.MODELS)]


@pytest.mark.parametrize("nfe", ["1", "2"])
def test_baseline_computes_train_objective(nfe):
    """Same weights and random stream: the authors'-step losses equal losses.py's objectives; the G update
    steps G, moves the EMA toward it and leaves no gradients behind."""
    _, args = bench.parse_args(["--model", "T/4", "--image-size", "8", "--batch-size", "4", "--nfe", nfe])
    generator_kwargs, discriminator_kwargs = train.network_kwargs(args, 3, 8, 10)
    nets = authors_step.build_nets(args, generator_kwargs, discriminator_kwargs, torch.device("cpu"))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(10, (4,))
    autocast = train.set_precision("fp32", torch.device("cpu"))

    torch.manual_seed(1)
    d_loss, _ = losses.discriminator_objective(nets.G, nets.D, x, y, nfe=args.nfe, pred=args.pred)
    torch.manual_seed(1)
    assert authors_step.d_update(nets, args, x, y, autocast) == pytest.approx(d_loss.item(), rel=1e-5)

    g_before, ema_before = ([p.detach().clone() for p in net.parameters()] for net in (nets.G, nets.ema))
    torch.manual_seed(2)
    for p in nets.d_params:
        p.requires_grad_(False)
    g_loss, _ = losses.generator_objective(nets.G, nets.D, nets.gradnorm, x, y, nfe=args.nfe, pred=args.pred,
                                           ot_scale=0.2)
    torch.manual_seed(2)
    assert authors_step.g_update(nets, args, x, y, 0.2, autocast) == pytest.approx(g_loss.item(), rel=1e-5)
    assert any(not torch.equal(b, p) for b, p in zip(g_before, nets.G.parameters()))
    for before, ema_p, p in zip(ema_before, nets.ema.parameters(), nets.G.parameters()):
        assert torch.allclose(ema_p, before.lerp(p, 1 - args.ema_decay))
    assert all(p.grad is None for p in (*nets.G.parameters(), *nets.D.parameters()))  # both zeroed
