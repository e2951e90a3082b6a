"""train.py end to end, on small data in the real formats: a CIFAR-10-format archive and a PNG
class folder."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import config
import train
from synthetic import make_images

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--model", "T/4", "--batch-size", "8", "--num-workers", "0", "--log-every", "2"]


def png_folder(root, per_class=4, size=32):
    images, labels = make_images(per_class=per_class, size=size)
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(root / f"class{label}", exist_ok=True)
        Image.fromarray(image).save(root / f"class{label}" / f"{i}.png")
    return str(root)


def run_train(args):
    train.main(args)
    return checkpoint.load(os.path.join(args[args.index("--out-dir") + 1], "ckpt.pt"))


def test_short_run_writes_checkpoint_log_and_grid(cifar, tmp_path):
    out = tmp_path / "out"
    state = run_train(["--data", "cifar10", "--data-path", cifar, "--out-dir", str(out), "--max-steps", "4",
                       "--sample-every", "2", "--ckpt-every", "2", *FAST])
    assert state["step"] == 4
    for key in ("G", "ema", "D", "gradnorm", "opt_g", "opt_d", "rng", "data", "config", "generator_kwargs"):
        assert key in state
    assert state["gradnorm"]["square_avg"] > 0  # the G step's backward went through the normalizer
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == [2, 4]
    for name in ("d_loss", "d_r1", "d_r2", "d_cp", "g_adv", "g_ot", "d_logits_real", "d_logits_fake",
                 "ot_scale", "lr_g", "d_grad_norm", "g_grad_norm", "img_per_s"):
        assert np.isfinite(records[-1][name]), name
    grid = Image.open(out / "samples_00000004.png")
    assert grid.size == (8 * 32, 10 * 32)  # a row of 8 per class
    assert json.load(open(out / "config.json"))["max_steps"] == 4


def assert_same_state(a, b):
    for net in ("G", "ema", "D", "gradnorm"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key}"
    for opt in ("opt_g", "opt_d"):
        for index, tensors in a[opt]["state"].items():
            for key, value in tensors.items():
                assert torch.equal(value, b[opt]["state"][index][key]), f"{opt}.{index}.{key}"
    assert a["data"] == b["data"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_resume_is_bitwise_exact(cifar, tmp_path):
    common = ["--data", "cifar10", "--data-path", cifar, "--sample-every", "1000", "--ckpt-every", "3", *FAST]
    straight = run_train([*common, "--out-dir", str(tmp_path / "a"), "--max-steps", "6"])
    run_train([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", "3"])
    resumed = run_train([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", "6", "--resume"])
    assert resumed["step"] == straight["step"] == 6
    assert_same_state(straight, resumed)


def test_requires_grad_pattern_isolates_the_updates(cifar, tmp_path):
    """A D update leaves G untouched (no_grad), a G update leaves D untouched (frozen), and D is
    trainable again."""
    args = train.parse_args(["--data", "cifar10", "--data-path", cifar, "--out-dir", str(tmp_path), *FAST])
    g_kwargs, d_kwargs = train.network_kwargs(args, 3, 32, 10)
    nets = train.build_nets(args, g_kwargs, d_kwargs, torch.device("cpu"), distributed=False)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    g_before = {k: v.clone() for k, v in nets.G.state_dict().items()}
    d_before = {k: v.clone() for k, v in nets.D.state_dict().items()}

    train.d_update(nets, args, x, y, contextlib.nullcontext)
    assert all(torch.equal(v, g_before[k]) for k, v in nets.G.state_dict().items())
    assert all(p.grad is None for p in nets.G.parameters())
    assert any(not torch.equal(v, d_before[k]) for k, v in nets.D.state_dict().items())

    d_after = {k: v.clone() for k, v in nets.D.state_dict().items()}
    nets.opt_d.zero_grad(set_to_none=True)
    train.g_update(nets, args, x, y, 0.2, contextlib.nullcontext)
    assert all(torch.equal(v, d_after[k]) for k, v in nets.D.state_dict().items())
    assert all(p.grad is None for p in nets.D.parameters())  # no parameter gradients for the frozen D
    assert any(not torch.equal(v, g_before[k]) for k, v in nets.G.state_dict().items())
    assert all(p.requires_grad for p in nets.D.parameters() if p is not nets.D.pos_embed)
    assert not nets.D.pos_embed.requires_grad  # the fixed positions stay fixed


def test_ot_scale_schedule():
    assert train.ot_scale_at(0, 0.2, 0.005, 100) == pytest.approx(0.2)
    assert train.ot_scale_at(50, 0.2, 0.005, 100) == pytest.approx((0.2 + 0.005) / 2)
    assert train.ot_scale_at(100, 0.2, 0.005, 100) == pytest.approx(0.005)
    assert train.ot_scale_at(10_000, 0.2, 0.005, 100) == pytest.approx(0.005)


def test_paper_defaults_for_imagenet():
    args = train.parse_args(["--data", "imagenet", "--data-path", "latents.npy"])
    assert (args.model, args.batch_size, args.lr, args.ema_decay) == ("XL/2", 256, 1e-4, 0.9999)
    assert (args.ot_start, args.ot_end, args.gp_scale, args.cp_scale, args.gp_eps) == \
        (0.2, 0.005, 0.25, 0.01, 0.01)
    assert (args.pred, args.grad_clip) == ("x", 50.0)
    multi = train.parse_args(["--data", "imagenet", "--nfe", "2"])
    assert (multi.pred, multi.ot_start, multi.grad_clip) == ("v", 0.25, 5.0)
    deep = train.parse_args(["--data", "imagenet", "--repeat", "2"])
    assert deep.grad_clip == 5.0


def test_flips_by_data_row():
    """Mirrored images belong to photos (CIFAR-10, ImageNet), not to digits, garments or a folder of unknown
    content, which flips only when asked."""
    flips = {data: train.parse_args(["--data", data]).flip for data in config.DATA}
    assert flips == {"fashion-mnist": False, "mnist": False, "cifar10": True, "folder": False,
                     "imagenet": True}
    assert train.parse_args(["--data", "folder", "--flip"]).flip
    assert not train.parse_args(["--data", "cifar10", "--no-flip"]).flip


@pytest.mark.parametrize("nfe", ["2", "any"])
def test_multistep_runs(cifar, tmp_path, nfe):
    state = run_train(["--data", "cifar10", "--data-path", cifar, "--out-dir", str(tmp_path),
                       "--max-steps", "2", "--nfe", nfe, "--sample-every", "2", *FAST])
    assert state["generator_kwargs"]["use_t_src"] and state["discriminator_kwargs"]["use_t"]
    assert state["generator_kwargs"]["use_t_tgt"] == (nfe == "any")
    assert state["config"]["pred"] == "v"


def test_torchrun_two_processes_keep_identical_parameters(tmp_path):
    folder = png_folder(tmp_path / "images")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "ddp_worker.py"), "--data", "folder", "--data-path", folder,
         "--image-size", "32", "--out-dir", str(out), "--max-steps", "3", "--sample-every", "3",
         "--device", "cpu", *FAST],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for net in ("G", "D", "ema", "gradnorm"):
        for key, value in ranks[0][net].items():
            assert torch.equal(value, ranks[1][net][key]), f"{net}.{key} differs between ranks"
    assert ranks[0]["data_seen"] != ranks[1]["data_seen"]  # the ranks read different shards
    state = checkpoint.load(out / "ckpt.pt")
    assert state["step"] == 3 and len(state["rng"]) == 2
    assert torch.equal(state["G"]["blocks.0.attn.qkv.weight"], ranks[0]["G"]["blocks.0.attn.qkv.weight"])
