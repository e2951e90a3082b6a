"""Tests for flow_matching.py: the objective against hand derivations, Euler sampling through the exact
velocity field of Gaussian data, and the command line end to end (checkpoints, resume, sample.py and
quality.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import flow_matching
import quality
from sample import sample

ROOT = Path(__file__).resolve().parent.parent


class Dirac(torch.nn.Module):
    """The exact velocity field when all data is one image x0: x_t = (1 - t) x0 + t z, so z - x0 =
    (x_t - x0) / t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x_t, y, t, _=None):
        return (x_t - self.x0) / t.view(-1, 1, 1, 1)


class Zero(torch.nn.Module):
    def forward(self, x_t, y, t, _=None):
        return torch.zeros_like(x_t)


def test_the_exact_velocity_of_a_single_image_has_zero_loss():
    x0 = torch.randn(1, 1, 4, 4).expand(64, 1, 4, 4)
    loss = flow_matching.flow_matching_loss(Dirac(x0[:1]), x0, torch.zeros(64, dtype=torch.long))
    assert loss.item() == pytest.approx(0.0, abs=1e-9)


def test_a_zero_velocity_costs_the_second_moment_of_noise_minus_data():
    # G = 0: loss = E ||z - x||^2 / n = E z^2 + E x^2 (z independent of x, mean 0) = 1 + mean(x^2)
    torch.manual_seed(0)
    x = torch.full((4096, 1, 4, 4), 0.5)
    loss = flow_matching.flow_matching_loss(Zero(), x, torch.zeros(4096, dtype=torch.long))
    standard_error = math.sqrt(2 / x.numel())  # var((z - 0.5)^2) = 2 for z ~ N(0, 1)
    assert loss.item() == pytest.approx(1.25, abs=4 * standard_error)


def test_times_are_logit_normal_and_the_loss_reaches_the_network_through_x_t():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x_t, y, t, _=None):
            seen.append((x_t, t))
            return torch.zeros_like(x_t)

    torch.manual_seed(1)
    x = torch.zeros(20_000, 1, 1, 1)  # x = 0: x_t = t z, so x_t / t is the noise itself
    flow_matching.flow_matching_loss(Recorder(), x, torch.zeros(20_000, dtype=torch.long))
    x_t, t = seen[0]
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.0, abs=0.05) and logit.std().item() == \
        pytest.approx(1.0, abs=0.05)
    z = x_t.flatten() / t
    assert z.mean().item() == pytest.approx(0.0, abs=0.05) and z.std().item() == pytest.approx(1.0, abs=0.05)


class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[z - x | x_t] for data x ~ N(m, s^2) per pixel. With a = 1 - t, b = t, x_t =
    a x + b z is Gaussian, and (z - x, x_t) jointly so: E[z - x | x_t] = -m + Cov(z - x, x_t) / Var(x_t)
    (x_t - a m), with Cov(z - x, x_t) = b - a s^2 and Var(x_t) = a^2 s^2 + b^2."""

    def __init__(self, m, s):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x_t, y, t, _=None):
        a, b = (1 - t).view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
        return -self.m + (b - a * self.s**2) / (a**2 * self.s**2 + b**2) * (x_t - a * self.m)


def test_euler_sampling_of_the_exact_field_reaches_the_datas_mean_and_variance():
    m, s = 0.7, 0.3
    velocity = GaussianVelocity(m, s)
    noise = torch.randn(20_000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.zeros(len(noise), dtype=torch.long)
    errors = []
    for steps in (1, 2, 4, 8, 16, 64):
        x = sample(velocity, noise, labels, nfe=steps, pred="v")
        errors.append(abs(x.std().item() - s) + abs(x.mean().item() - m))
        if steps == 1:  # one Euler step from t = 1 lands every sample on E[x] = m: no variance at all
            assert x.std().item() == pytest.approx(0.0, abs=1e-12)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.01, errors  # 20,000 x 4 samples: standard errors of about 0.001


# ------------------------------------------------------------------------------------------------------------
# The command line


def fm_run(cifar, out_dir, *extra):
    """flow_matching.py in this process, on the CIFAR-format archive -> its ckpt.pt."""
    flow_matching.main(["--data", "cifar10", "--data-path", cifar, "--model", "T/4", "--batch-size", "8",
                        "--log-every", "2", "--sample-every", "1000", "--out-dir", str(out_dir), *extra])
    return checkpoint.load(str(out_dir / "ckpt.pt"))


def test_resume_is_bitwise_exact(cifar, tmp_path):
    straight = fm_run(cifar, tmp_path / "a", "--max-steps", "6")
    fm_run(cifar, tmp_path / "b", "--max-steps", "3")
    resumed = fm_run(cifar, tmp_path / "b", "--max-steps", "6", "--resume")
    assert straight["step"] == resumed["step"] == 6 and straight["objective"] == "flow matching"
    for part in ("G", "ema"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key}"
    for index, tensors in straight["opt"]["state"].items():
        for key, value in tensors.items():
            assert torch.equal(value, resumed["opt"]["state"][index][key]), f"opt.{index}.{key}"
    records = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["step"] for r in records] == [2, 4, 6] and all(r["fm_loss"] > 0 for r in records)


def test_sample_and_quality_take_any_step_count_of_a_flow_matching_checkpoint(cifar, tmp_path):
    fm_run(cifar, tmp_path / "fm", "--max-steps", "2")
    ckpt = tmp_path / "fm" / "ckpt.pt"
    for steps in ("1", "3"):
        out = tmp_path / f"grid{steps}.png"
        subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(ckpt), "--nfe", steps, "--out",
                        str(out)], check=True, cwd=ROOT, capture_output=True, timeout=300)
        assert out.stat().st_size > 0
    # quality.py at two step counts, with a judge trained on the same discs
    judge = quality.train_judge("cifar10", cifar, 32, steps=20, batch_size=16, log=lambda message: None)
    checkpoint.save(judge, str(tmp_path / "judge.pt"))
    command = [sys.executable, str(ROOT / "quality.py"), "--judge", str(tmp_path / "judge.pt"), "--ckpt",
               str(ckpt), "--nfe", "1,2", "--samples", "20"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("nfe ")]
    assert [line.split(":")[0] for line in lines] == ["nfe 1", "nfe 2"]
    assert all("precision" in line and "recall" in line for line in lines), lines
