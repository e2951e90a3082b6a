"""Train an Adversarial Flow Model.

    python train.py                                    # tiny model, CIFAR-10, pixel space, on one CPU or GPU
    torchrun --nproc_per_node=8 train.py --data imagenet --data-path latents.npy --model XL/2   # the paper

One step is one discriminator update followed by one generator update (paper sec. 3.1; TTUR 1:1), each on its own
data batch of --batch-size images (global, split over ranks). The pieces, in the order they run:

    data        data.py: CIFAR-10 archive, image folders, or pre-extracted ImageNet latents; rank-sharded, resumable
    models      model.py: G (the flow/transport map), D, and an EMA of G used for sampling
    D update    losses.discriminator_objective: relativistic loss + w-weighted finite-difference R1/R2 + centering
    G update    losses.generator_objective: relativistic loss through gradnorm.py + lambda_ot * OT loss / w,
                with D frozen (its parameters get no gradients)
    schedule    lambda_ot follows a cosine from --ot-start to --ot-end over --ot-decay-steps, then stays (Table 2)
    checkpoint  checkpoint.py: everything needed to continue bitwise-exactly, written atomically

Under torchrun each rank runs this same file; DDP averages gradients only where a network is being updated:
the D update goes through DDP(D), the G update through DDP(G), and the frozen or no_grad calls use the plain
modules. Rank 0 alone writes files.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import classifier
import data
import fid
import losses
import quality
import vae
from augment import PairedAugment
from gradnorm import GradientNormalization
from model import MODELS, Discriminator, Generator
from sample import LATENT_SCALE, sample, sample_images

# ----------------------------------------------------------------------------------------------------------------
# Configuration. Flags left unset take the preset of their data source; the paper's values are the ImageNet ones.

PRESETS = {
    # The laptop default: a tiny DiT on 32x32 CIFAR-10 pixels. lambda_ot decays over the first 2000 steps: while it
    # is near 0.2 the OT term holds G close to the identity (samples look like noise; see README).
    # CIFAR-10 sits in memory, so reading it needs no worker processes.
    "cifar10": dict(model="T/4", image_size=32, batch_size=32, lr=2e-4, max_steps=20_000, ema_decay=0.999,
                    ot_decay_steps=2_000, ckpt_every=1000, sample_every=1000, log_every=50, num_workers=0),
    "mnist": dict(model="T/4", image_size=28, batch_size=32, lr=2e-3, max_steps=20_000, ema_decay=0.99, ema_warmup=10,
                  ot_start=0.05, ot_end=0.005, ot_decay_steps=500, flip=False, judge_every=100, ckpt_every=500,
                  sample_every=200, log_every=25, num_workers=0),
    "fashion-mnist": dict(model="T/4", image_size=28, batch_size=32, lr=2e-3, max_steps=20_000, ema_decay=0.99,
                          ema_warmup=10, ot_start=0.05, ot_end=0.005, ot_decay_steps=500, flip=False,
                          judge_every=100, ckpt_every=500, sample_every=200, log_every=25, num_workers=0),
    "folder": dict(model="T/4", image_size=32, batch_size=32, lr=2e-4, max_steps=20_000, ema_decay=0.999,
                   ot_decay_steps=2_000, ckpt_every=1000, sample_every=1000, log_every=50, num_workers=4),
    # The paper (Table 10/11, phase 1): XL/2 on SD-VAE latents, batch 256, lr 1e-4, EMA 0.9999, lambda_ot decayed
    # over 100 epochs = 1M alternating iterations = 500k of our D+G steps.
    "imagenet": dict(model="XL/2", image_size=256, batch_size=256, lr=1e-4, max_steps=1_000_000, ema_decay=0.9999,
                     ot_decay_steps=500_000, ckpt_every=5000, sample_every=5000, log_every=100, num_workers=8),
}


def phase_preset(phase, nfe, repeat, model):
    """One row of the paper's Table 11, the schedule the authors ran by hand, for this model, NFE and depth.

    1  guidance-free, lambda_ot cosine 0.2 -> 0.005 (0.25 for multi-step; -> 0.01 for B/2), lr 1e-4
    2  lambda_ot constant 0.001, lr 8e-5, EMA reload
    3  lr 3e-5, EMA reload and D reload when FID stalls
    4  guidance: flow-based CG (1-NFE: 0.003, t' ~ U(0, 0.1), lr 5e-5; multi-step: 0.02 at target t in {0} or
       {0, 0.25}, lr 3e-5) with discriminator augmentation p = 0.4
    Deep generators (repeat R) use the D learning rates below and G's = D's / R, as in the table.
    """
    multi_step = nfe != 1
    lr = {1: 1e-4, 2: 8e-5, 3: 3e-5, 4: 3e-5 if multi_step else 5e-5}[phase]
    lr = {2: {3: 3e-5, 4: 2e-5}, 4: {3: 1e-5, 4: 2e-5}}.get(repeat, {}).get(phase, lr)
    preset = dict(lr=lr)
    if phase == 1:
        preset.update(ot_start=0.25 if multi_step else 0.2, ot_end=0.01 if model == "B/2" else 0.005)
    else:
        preset.update(ot_start=0.001, ot_end=0.001, ema_reload_every=5000)  # every 10k-iteration evaluation
    if phase >= 3:
        preset.update(d_reload_on_stall=3)
    if phase == 4 and multi_step:
        preset.update(cg_scale=0.02, augment_p=0.4)  # at the target times of CG_TARGET_TIMES
    elif phase == 4:
        preset.update(cg_scale=0.003, cg_t="0,0.1", augment_p=0.4)
    return preset


# Multi-step guidance applies the cross-entropy at t' = t on these target times only (Table 11, eq. 38). The paper
# gives them for 2 and 4 NFE; other K need --cg-target-times. Any-step models guide every sample at its own t.
CG_TARGET_TIMES = {2: "0", 4: "0,0.25"}

# What the weights, the data position or the random streams depend on: a resumed run cannot change these. Every
# other flag given with --resume takes effect (learning rates, schedules, guidance, logging, precision, ...).
FIXED_ON_RESUME = ("data", "image_size", "model", "nfe", "pred", "repeat", "batch_size", "seed", "phase",
                   "init_from", "d_reload")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train an Adversarial Flow Model. One step = one D update + one G update, each on a batch of "
                    "--batch-size images (global, over all ranks). Unset flags take the --data preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=list(PRESETS), default="cifar10",
                   help="cifar10, mnist, fashion-mnist: downloaded to ./data once; folder: root/<class>/<image>; "
                        "imagenet: a latents .npy from `python vae.py` or an image folder encoded with --vae")
    p.add_argument("--data-path", default=None, help="dataset location (cifar10: directory of the archive)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (cifar10: 32; imagenet: 256)")
    p.add_argument("--vae", default=None, help="sd-vae-ft-mse weights, to encode an ImageNet image folder on the fly")
    p.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)}")
    p.add_argument("--nfe", default="1", help="generator steps: 1, 2, 4, ... or 'any'")
    p.add_argument("--pred", choices=["x", "v"], default=None, help="G predicts x_t (x) or a velocity (v); "
                   "default: x for 1 NFE, v otherwise, as in the paper")
    p.add_argument("--repeat", type=int, default=1, help="depth repetition of G's blocks (2 -> 56, 4 -> 112 layers "
                   "for XL/2); G's learning rate is divided by it")
    p.add_argument("--batch-size", type=int, default=None, help="global batch for each of the D and G updates")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate of D, and of G before / repeat")
    p.add_argument("--g-lr", type=float, default=None, help="G's learning rate (default: --lr / --repeat)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--ema-warmup", type=int, default=None, help="the EMA decays at min(--ema-decay, (1 + step) / "
                   "(warmup + step)), so it forgets the random start within a few steps (0: off, the paper)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips of the training images (default: on; off for mnist and "
                        "fashion-mnist, whose mirrored digits and shoes are not in the data)")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (default 50 for 1-NFE, "
                   "5 for multi-step and deep generators, as the authors' configs)")
    p.add_argument("--ot-start", type=float, default=None, help="lambda_ot at step 0 (0.2; 0.25 multi-step)")
    p.add_argument("--ot-end", type=float, default=None, help="lambda_ot after the cosine decay (0.005)")
    p.add_argument("--ot-decay-steps", type=int, default=None, help="length of the cosine decay, in steps")
    p.add_argument("--gp-scale", type=float, default=0.25, help="lambda_gp for the R1 and R2 penalties")
    p.add_argument("--gp-eps", type=float, default=0.01, help="finite-difference step of R1/R2")
    p.add_argument("--gp-ratio", type=float, default=0.25, help="fraction of the batch that gets R1/R2")
    p.add_argument("--cp-scale", type=float, default=0.01, help="lambda_cp of the logit-centering penalty")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="also stop after this many minutes of "
                   "training (judging and FID not counted)")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt; flags given now take "
                   "effect, except " + ", ".join("--" + f.replace("_", "-") for f in FIXED_ON_RESUME))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32",
                   help="CUDA matmul precision; bf16 is autocast and opt-in (the paper trains in TF32). "
                        "CPU always runs fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading worker processes per rank")
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--keep", type=int, default=0, help="also keep the last N step-stamped checkpoints")
    p.add_argument("--sample-every", type=int, default=None, help="write an EMA sample grid every N steps")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss or gradient")
    p.add_argument("--phase", type=int, choices=[1, 2, 3, 4], default=None,
                   help="apply that row of the paper's Table 11 for --model/--nfe/--repeat; explicit flags win")
    p.add_argument("--init-from", default=None, help="start from another run's ckpt.pt: G, EMA, D and gradnorm "
                   "state are kept, optimizers and hyperparameters are new (the previous phase's checkpoint)")
    p.add_argument("--classifier", default=None, help="classifier.pt for flow-based classifier guidance")
    p.add_argument("--cg-scale", type=float, default=None, help="lambda_cg (0: no guidance)")
    p.add_argument("--cg-t", default=None, help="1-NFE guidance: t' ~ U(lo, hi), as 'lo,hi' (eq. 26)")
    p.add_argument("--cg-target-times", default=None,
                   help="multi-step guidance: CE at t' = the target time, on these target times, e.g. '0,0.25'")
    p.add_argument("--augment-p", type=float, default=None, help="discriminator augmentation probability")
    p.add_argument("--ema-reload-every", type=int, default=None, help="copy the EMA into G every N steps (0: off)")
    p.add_argument("--d-reload", default=None, help="start D from this checkpoint's D")
    p.add_argument("--d-reload-on-stall", type=int, default=None,
                   help="reload D from the best-FID point after this many evaluations without improvement")
    p.add_argument("--judge-every", type=int, default=None, help="every N steps, label class-balanced 1-NFE EMA "
                   "samples with a small classifier trained on the real images: class accuracy and Frechet "
                   "distance in its features (quality.py; cifar10, mnist, fashion-mnist and small folders; 0: off)")
    p.add_argument("--judge", default=None, help="judge file for --judge-every (default: OUT_DIR/judge.pt, "
                   "trained there on first use, about a minute on a CPU)")
    p.add_argument("--judge-samples", type=int, default=1000, help="samples per judgement")
    p.add_argument("--fid-every", type=int, default=0, help="in-loop FID of the EMA every N steps (0: off)")
    p.add_argument("--fid-samples", type=int, default=10_000, help="class-balanced samples per in-loop FID")
    p.add_argument("--fid-ref", default=None, help="reference statistics .npz (mu, sigma) from `fid.py --stats`")
    p.add_argument("--fid-weights", default=None, help="FID Inception weights (default: downloaded once)")
    p.add_argument("--train-classifier", action="store_true",
                   help="an alias of `python classifier.py`: train the time-conditioned classifier for flow-based "
                        "guidance instead, with the other flags passed on (see `python classifier.py --help`)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    args.given = checkpoint.flags_given(p, argv)  # on --resume, these override the checkpoint's configuration
    try:
        args.nfe = "any" if args.nfe == "any" else int(args.nfe)
    except ValueError:
        p.error(f"--nfe must be a positive integer or 'any', got {args.nfe!r}")
    multi_step = args.nfe != 1
    # Precedence: explicit flags, then the --phase row, then the --data preset, then the paper's defaults.
    model = args.model or PRESETS[args.data]["model"]
    presets = [phase_preset(args.phase, args.nfe, args.repeat, model) if args.phase else {}, PRESETS[args.data],
               dict(pred="v" if multi_step else "x", ot_start=0.25 if multi_step else 0.2, ot_end=0.005,
                    grad_clip=5.0 if multi_step or args.repeat > 1 else 50.0, cg_scale=0.0, cg_t="0,0.1",
                    cg_target_times=CG_TARGET_TIMES.get(args.nfe), augment_p=0.0, ema_reload_every=0,
                    d_reload_on_stall=0, ema_warmup=0, flip=True, judge_every=0)]
    for preset in presets:
        for name, value in preset.items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)
    args.g_lr = args.g_lr or args.lr / args.repeat
    return args


class ArgumentError(data.DataError):
    """Bad flags: every rank raises the same one, rank 0 alone prints it."""


def validate(args, world_size):
    if args.model not in MODELS:
        raise ArgumentError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
    if args.batch_size <= 0 or args.batch_size % world_size:
        raise ArgumentError(f"--batch-size {args.batch_size} must be positive and divisible by the number of "
                             f"processes ({world_size})")
    if args.nfe != "any" and args.nfe < 1:
        raise ArgumentError(f"--nfe must be a positive integer or 'any', got {args.nfe}")
    if args.repeat < 1 or (args.repeat > 1 and args.nfe != 1):
        raise ArgumentError("--repeat needs a 1-NFE generator (--nfe 1) and must be >= 1")
    if args.cg_scale > 0 and not args.classifier:
        raise ArgumentError("classifier guidance (--cg-scale > 0, or --phase 4) needs --classifier PATH; train "
                             "one with `python classifier.py`")
    if args.cg_scale > 0 and args.nfe == "any" and args.cg_target_times is not None:
        raise ArgumentError("--cg-target-times picks among a K-step model's target times; --nfe any draws t "
                             "continuously and guides every sample at t' = t (eq. 38): drop --cg-target-times")
    if args.cg_scale > 0 and args.nfe not in (1, "any"):
        check_target_times(args.cg_target_times, args.nfe)
    if args.judge_every and args.data == "imagenet":
        raise ArgumentError("--judge-every judges small pixel datasets (cifar10, mnist, fashion-mnist, folder); "
                             "on ImageNet use the in-loop FID (--fid-every)")
    if args.d_reload_on_stall and not (args.fid_every and args.fid_ref):
        raise ArgumentError("--d-reload-on-stall (phases 3 and 4) watches the in-loop FID: pass --fid-every N "
                             "and --fid-ref STATS.npz, or --d-reload-on-stall 0")


def check_target_times(text, nfe):
    """--cg-target-times for a K-step generator: a comma-separated subset of its target times 0, 1/K, ..., 1 - 1/K
    (any other time never occurs in training, so guidance there would silently do nothing)."""
    targets = [k / nfe for k in range(nfe)]
    listed = ", ".join(f"{t:g}" for t in targets)
    if text is None:
        raise ArgumentError(f"multi-step guidance needs --cg-target-times for --nfe {nfe} (the paper gives them for "
                             f"2 and 4 NFE only): a comma-separated subset of {listed}")
    try:
        times = [float(v) for v in text.split(",")]
    except ValueError:
        raise ArgumentError(f"--cg-target-times must be comma-separated numbers, got {text!r}") from None
    for chosen in times:
        if min(abs(chosen - t) for t in targets) > 1e-6:
            raise ArgumentError(f"--cg-target-times {chosen:g} is not a target time of a {nfe}-step generator "
                                 f"({listed})")


def ot_scale_at(step, start, end, decay_steps):
    """Cosine from start to end over decay_steps, then constant (sec. 3.2, Table 2)."""
    progress = min(step / max(decay_steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Processes and devices


def setup_distributed(device_arg):
    """-> rank, world_size, device. Under torchrun: NCCL on CUDA, gloo on CPU. Plain python: one process."""
    if "RANK" in os.environ:
        rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        use_cuda = torch.cuda.is_available() and device_arg in (None, "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return 0, 1, torch.device(device_arg)


def set_precision(precision, device):
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext  # CPUs without bf16 units run autocast far slower than fp32: never by default


# ----------------------------------------------------------------------------------------------------------------
# Models, optimizers, EMA


@dataclass
class Nets:
    """The trained state, plus the callables each phase of a step uses (plain, compiled or DDP-wrapped)."""
    G: Generator
    D: Discriminator
    ema: Generator
    gradnorm: GradientNormalization
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    G_train: object      # G for the G update: DDP(G) under torchrun, so its gradients are averaged
    G_frozen: object     # G under no_grad in the D update: no gradient sync
    D_train: object      # D for the D update: DDP(D) under torchrun
    D_frozen: object     # D with frozen parameters in the G update: no gradient sync
    d_params: list       # D's trainable parameters, frozen during the G update (the fixed pos_embed is not one)


def network_kwargs(args, in_channels, input_size, num_classes):
    """Constructor arguments of G and D; stored in the checkpoint so sample.py can rebuild them."""
    dit = dict(MODELS[args.model], input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    generator = dict(dit, use_t_src=args.nfe != 1, use_t_tgt=args.nfe == "any", repeat=args.repeat)
    discriminator = dict(dit, use_t=args.nfe != 1)  # D sees the target time only, never the source (sec. 3.4)
    return generator, discriminator


def build_nets(args, generator_kwargs, discriminator_kwargs, device, distributed):
    G = Generator(**generator_kwargs).to(device)
    D = Discriminator(**discriminator_kwargs).to(device)
    ema = Generator(**generator_kwargs).to(device).requires_grad_(False).eval()
    ema.load_state_dict(G.state_dict())
    gradnorm = GradientNormalization().to(device)
    fused = device.type in ("cuda", "cpu")  # one kernel for the whole update (CPU since torch 2.4)
    d_params = [p for p in D.parameters() if p.requires_grad]
    g_params = [p for p in G.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(g_params, lr=args.g_lr, betas=(0.0, 0.9), eps=1e-8, weight_decay=args.weight_decay,
                              fused=fused)
    opt_d = torch.optim.AdamW(d_params, lr=args.lr, betas=(0.0, 0.9), eps=1e-8,
                              weight_decay=args.weight_decay, fused=fused)

    def wrap(module, sync):
        if sync and distributed:
            module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(module) if args.compile else module

    return Nets(G, D, ema, gradnorm, opt_g, opt_d, G_train=wrap(G, True), G_frozen=wrap(G, False),
                D_train=wrap(D, True), D_frozen=wrap(D, False), d_params=d_params)


def ema_decay_at(step, decay, warmup):
    """min(decay, (1 + step) / (warmup + step)): an average over about step / warmup of the steps so far, until
    that reaches the set decay. A short run's EMA then holds no trace of the random initial weights."""
    return min(decay, (1 + step) / (warmup + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------------------------------------------
# One training step


def d_update(nets, args, x, y, autocast, augment=None):
    """One discriminator update. G runs under no_grad; D sees real, fake and the perturbed subsets in one forward.
    Returns (metrics, finite)."""
    with autocast():
        loss, metrics = losses.discriminator_objective(
            nets.G_frozen, nets.D_train, x, y, nfe=args.nfe, pred=args.pred, gp_scale=args.gp_scale,
            cp_scale=args.cp_scale, gp_eps=args.gp_eps, gp_ratio=args.gp_ratio, augment=augment)
    nets.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    metrics["d_grad_norm"] = torch.nn.utils.clip_grad_norm_(nets.D.parameters(), args.grad_clip).detach()
    finite = bool(torch.isfinite(metrics["d_grad_norm"] + metrics["d_loss"]))
    if finite:
        nets.opt_d.step()
    return metrics, finite


def g_update(nets, args, x, y, ot_scale, autocast, augment=None, guidance=None, ema_decay=None):
    """One generator update. D's parameters are frozen, so the backward pass computes only the gradient with
    respect to D's input, never D's parameter gradients. Returns (metrics, finite)."""
    for p in nets.d_params:
        p.requires_grad_(False)
    square_avg = nets.gradnorm.square_avg.clone()
    try:
        with autocast():
            loss, metrics = losses.generator_objective(
                nets.G_train, nets.D_frozen, nets.gradnorm, x, y, nfe=args.nfe, pred=args.pred,
                ot_scale=ot_scale, augment=augment, guidance=guidance)
        nets.opt_g.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        for p in nets.d_params:
            p.requires_grad_(True)
    metrics["g_grad_norm"] = torch.nn.utils.clip_grad_norm_(nets.G.parameters(), args.grad_clip).detach()
    finite = bool(torch.isfinite(metrics["g_grad_norm"] + metrics["g_loss"]))
    if finite:
        nets.opt_g.step()
        update_ema(nets.ema, nets.G, args.ema_decay if ema_decay is None else ema_decay)
    else:
        nets.gradnorm.square_avg.copy_(square_avg)  # a NaN must not enter the normalizer's EMA
    return metrics, finite


def train_step(nets, args, x_d, y_d, x_g, y_g, ot_scale, autocast, augment=None, guidance=None, ema_decay=None):
    """One step = one D update, then one G update, on independent batches. Returns (metrics, both finite).

    A non-finite loss or gradient skips that update, so a single bad batch cannot poison the weights; train()
    stops after --max-bad-steps consecutive bad steps. Checking needs one host sync per update: the price of
    never applying a NaN.
    """
    d_metrics, d_ok = d_update(nets, args, x_d, y_d, autocast, augment)
    g_metrics, g_ok = g_update(nets, args, x_g, y_g, ot_scale, autocast, augment, guidance, ema_decay)
    return {**d_metrics, **g_metrics}, d_ok and g_ok


def make_guidance(args, device):
    """The flow-based classifier-guidance term for the G step, or None. The classifier is frozen, in eval mode,
    and runs inside the same autocast as D. 1-NFE: t' ~ U(lo, hi) with fresh noise (eq. 26). Multi-step: the
    cross-entropy at t' = the target time t of each sample, on the chosen target times only (eq. 38; Table 11);
    any-step: the same on every sample, since its target times are continuous."""
    if args.cg_scale <= 0:
        return None
    guide = classifier.load_classifier(args.classifier, device)
    if args.nfe == 1:
        t_lo, t_hi = (float(v) for v in args.cg_t.split(","))
        return lambda fake, y, t: args.cg_scale * losses.classifier_guidance_loss(guide, fake, y, t_lo, t_hi)
    if args.nfe == "any":  # t ~ U(0, s) is continuous: every sample is guided at its own target time
        return lambda fake, y, t: args.cg_scale * torch.nn.functional.cross_entropy(guide(fake, t), y)
    target_times = torch.tensor([float(v) for v in args.cg_target_times.split(",")], device=device)

    def multistep_guidance(fake, y, t):
        selected = (t[:, None] - target_times[None]).abs().min(dim=1).values < 1e-6  # (N,) bool
        ce = torch.nn.functional.cross_entropy(guide(fake, t), y, reduction="none")
        return args.cg_scale * (ce * selected).mean()

    return multistep_guidance


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_state(nets, args, step, loader, rng_states, generator_kwargs, discriminator_kwargs):
    return {"step": step, "config": vars(args), "generator_kwargs": generator_kwargs,
            "discriminator_kwargs": discriminator_kwargs,
            "G": nets.G.state_dict(), "ema": nets.ema.state_dict(), "D": nets.D.state_dict(),
            "gradnorm": nets.gradnorm.state_dict(), "opt_g": nets.opt_g.state_dict(),
            "opt_d": nets.opt_d.state_dict(), "data": loader.state_dict(), "rng": rng_states}


def save_checkpoint(state, nets, out_dir, keep):
    """Atomically write out_dir/ckpt.pt (and a step-stamped copy when --keep). Never writes non-finite weights."""
    if not all_finite(list(nets.G.parameters()) + list(nets.D.parameters()) + list(nets.ema.parameters())):
        print(f"warning: not saving step {state['step']}: the weights are not finite", file=sys.stderr)
        return False
    path = os.path.join(out_dir, "ckpt.pt")
    checkpoint.save(state, path)
    if keep > 0:
        stamped = os.path.join(out_dir, f"ckpt-{state['step']:08d}.pt")
        if os.path.exists(stamped):
            os.remove(stamped)
        os.link(path, stamped)  # a second name for the same finished file: atomic and free
        old = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt-") and f.endswith(".pt"))[:-keep]
        for name in old:
            os.remove(os.path.join(out_dir, name))
    return True


def load_networks(nets, state, source):
    """G, EMA, D and the gradient-normalization EMA from a train.py checkpoint (resume, or --init-from)."""
    if not isinstance(state, dict) or not all(k in state for k in ("G", "ema", "D", "gradnorm")):
        raise checkpoint.CheckpointError(f"{source} is not a train.py checkpoint (it needs G, ema, D, gradnorm)")
    for name, module in [("G", nets.G), ("ema", nets.ema), ("D", nets.D), ("gradnorm", nets.gradnorm)]:
        checkpoint.load_weights(module, state[name], what=f"{source} [{name}]")


def restore(nets, state, loader, rank, world_size, args):
    """Everything a checkpoint holds, so that the run continues exactly as if it had never stopped; then the
    learning rates and weight decay of args, which --resume may have changed (an optimizer's state_dict carries
    its own)."""
    load_networks(nets, state, "checkpoint")
    nets.opt_g.load_state_dict(state["opt_g"])
    nets.opt_d.load_state_dict(state["opt_d"])
    for optimizer, lr in ((nets.opt_g, args.g_lr), (nets.opt_d, args.lr)):
        for group in optimizer.param_groups:
            group.update(lr=lr, weight_decay=args.weight_decay)
    loader.load_state_dict(state["data"])
    if len(state["rng"]) == world_size:
        checkpoint.set_rng_state(state["rng"][rank])
    else:
        print("warning: resuming with a different number of processes; random streams restart", file=sys.stderr)
        torch.manual_seed(state["step"] * 1000 + rank)


@torch.no_grad()
def encode_latents(autoencoder, images):
    """[-1, 1] images (N, 3, 256, 256) -> scaled SD-VAE latents (N, 4, 32, 32): a posterior sample, encoded in
    bf16 on CUDA (as the authors do) and fp32 elsewhere."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        mean, logvar = autoencoder.encode(images)
    mean, logvar = mean.float(), logvar.float()
    return LATENT_SCALE * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))


# ----------------------------------------------------------------------------------------------------------------
# Sample grids


def save_grid(images, path, nrow):
    """images: (N, C, H, W) in [-1, 1] -> one PNG, nrow images per row."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    N, C, H, W = images.shape
    rows = math.ceil(N / nrow)
    grid = torch.zeros(C, rows * H, nrow * W, dtype=torch.uint8)
    for i, image in enumerate(images):
        grid[:, (i // nrow) * H:(i // nrow + 1) * H, (i % nrow) * W:(i % nrow + 1) * W] = image
    from PIL import Image
    Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy()).save(path)


def grid_inputs(num_classes, shape, seed, device, per_class=8, max_classes=10):
    """Fixed noise and labels for the progress grid: one row per class. Uses its own generator, so drawing it
    does not disturb the training random stream."""
    classes = torch.linspace(0, num_classes - 1, min(num_classes, max_classes)).round().long()
    labels = classes.repeat_interleave(per_class)
    noise = torch.randn(len(labels), *shape, generator=torch.Generator().manual_seed(seed))
    return noise.to(device), labels.to(device)


# ----------------------------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def in_loop_fid(ema, args, inception, reference, decode, device, rank, world_size):
    """FID of --fid-samples class-balanced EMA samples against --fid-ref. Sample i always gets the noise of
    (seed, i), so successive evaluations compare like with like; the ranks split the samples and sum their
    feature statistics. A rough in-training estimate: report final numbers from 50k samples (README)."""
    stats = fid.FeatureStatistics(device=device)
    indices = np.arange(rank, args.fid_samples, world_size)
    nfe = 8 if args.nfe == "any" else args.nfe
    for start in range(0, len(indices), args.batch_size // world_size):
        batch = indices[start:start + args.batch_size // world_size]
        labels = torch.from_numpy(batch % ema.num_classes)
        images = sample_images(ema, decode, batch, labels, args.seed, nfe, args.pred, device)  # uint8 NHWC
        stats.update(inception(images.to(device).permute(0, 3, 1, 2)))
    if world_size > 1:
        count = torch.tensor(float(stats.count), dtype=torch.float64, device=stats.sum.device)
        for total in (stats.sum, stats.sum_outer, count):
            dist.all_reduce(total)
        stats.count = int(count.item())
    mu, sigma = stats.mean_and_covariance()
    value = torch.tensor(fid.frechet_distance(mu, sigma, reference["mu"], reference["sigma"]), device=device)
    if world_size > 1:
        dist.broadcast(value, src=0)  # every rank takes the same reload decisions
    return value.item()


def train(args):
    rank, world_size, device = setup_distributed(args.device)
    given = set(vars(args).pop("given", ()))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    resume_state = checkpoint.load(ckpt_path) if args.resume else None
    if resume_state is not None:  # continue with the checkpoint's flags, except those typed now
        args = argparse.Namespace(**checkpoint.resumed_config(
            resume_state["config"], vars(args), given | {"out_dir", "resume"}, FIXED_ON_RESUME))
        if "lr" in given and "g_lr" not in given:
            args.g_lr = args.lr / args.repeat
    validate(args, world_size)
    main_process = rank == 0
    if main_process:
        checkpoint.check_out_dir(args.out_dir)
        for name in os.listdir(args.out_dir):  # left by a process killed while writing; never a checkpoint
            if name.startswith(".") and ".pt.tmp" in name:
                os.remove(os.path.join(args.out_dir, name))
    autocast = set_precision(args.precision, device)
    np.random.seed(args.seed)
    random.seed(args.seed)

    # Data. Rank 0 goes first, so that only it downloads.
    if world_size > 1 and not main_process:
        dist.barrier()
    dataset, num_classes, in_channels, input_size = data.make_dataset(args.data, args.data_path, args.image_size)
    if world_size > 1 and main_process:
        dist.barrier()
    loader = data.Loader(dataset, args.batch_size // world_size, rank=rank, world_size=world_size, seed=args.seed,
                         num_workers=args.num_workers, device=device, flip=args.flip)
    autoencoder = vae.load_vae(args.vae, device) if args.vae else None
    encode_on_the_fly = args.data == "imagenet" and in_channels == 3
    if encode_on_the_fly:  # an ImageNet image folder: the networks see SD-VAE latents
        if autoencoder is None:
            raise data.DataError("--data imagenet with an image folder needs --vae (sd-vae-ft-mse weights), or "
                                 "latents extracted once with `python vae.py`")
        in_channels, input_size = 4, input_size // 8

    def next_batch():
        x, y = next(loader)
        return (encode_latents(autoencoder, x) if encode_on_the_fly else x), y

    def decode(x):  # generator output -> [-1, 1] pixels, or None when latents cannot be decoded
        if in_channels != 4:
            return x
        return autoencoder.decode(x / LATENT_SCALE) if autoencoder is not None else None

    # Networks, and where they start from: a resumed run, a previous phase (--init-from), or scratch.
    generator_kwargs, discriminator_kwargs = network_kwargs(args, in_channels, input_size, num_classes)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    nets = build_nets(args, generator_kwargs, discriminator_kwargs, device, distributed=world_size > 1)
    torch.manual_seed(args.seed * 1000 + rank + 1)  # then each rank draws its own noise
    step, best_fid, evals_since_best, best_d = 0, None, 0, None
    if resume_state is not None:
        restore(nets, resume_state, loader, rank, world_size, args)
        step, best_fid, evals_since_best = resume_state["step"], *resume_state["fid_tracking"]
        best_d = resume_state.get("best_D")
    else:
        if args.init_from:
            load_networks(nets, checkpoint.load(args.init_from), args.init_from)
        if args.d_reload:
            reload_state = checkpoint.load(args.d_reload)
            checkpoint.load_weights(nets.D, reload_state.get("D", reload_state), what=f"--d-reload {args.d_reload}")
    guidance = make_guidance(args, device)
    augment = PairedAugment(p=args.augment_p) if args.augment_p > 0 else None
    judge = None
    if args.judge_every and main_process:
        judge_path = args.judge or os.path.join(args.out_dir, "judge.pt")
        judge = quality.SampleJudge(*quality.judge_or_train(judge_path, args.data, args.data_path, input_size),
                                    (in_channels, input_size, input_size), args.judge_samples, args.seed)
    if args.fid_every:
        inception = fid.load_inception(args.fid_weights, device=device)
        reference = np.load(args.fid_ref)
        if "mu" not in reference or "sigma" not in reference:
            raise data.DataError(f"--fid-ref {args.fid_ref} has no mu/sigma: write it with `python fid.py --stats`")

    if main_process:
        n_params = sum(p.numel() for p in nets.G.parameters()) / 1e6
        print(f"G {args.model} ({n_params:.1f}M params), {len(dataset)} training samples, {world_size} x {device}, "
              f"global batch {args.batch_size}, starting at step {step}")
        print("config: " + json.dumps(vars(args)))
        with open(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    grid_noise, grid_labels = grid_inputs(num_classes, (in_channels, input_size, input_size), args.seed, device)
    log_file = open(os.path.join(args.out_dir, "log.jsonl"), "a") if main_process else None
    stop = checkpoint.StopFlag()
    bad_steps, last_saved_step, pending = 0, (step if resume_state is not None else None), []
    progress = tqdm(total=args.max_steps, initial=step, disable=not main_process, dynamic_ncols=True)
    tic, tic_step = time.time(), step
    # The training clock: wall time minus judging and FID, carried over on resume.
    clock_start, eval_seconds = time.time() - (resume_state or {}).get("train_seconds", 0.0), 0.0

    def train_seconds():
        return time.time() - clock_start - eval_seconds

    def judge_samples():
        nonlocal eval_seconds
        tic_judge, minutes = time.time(), train_seconds() / 60
        result = judge(nets.ema, nfe=8 if args.nfe == "any" else args.nfe, pred=args.pred)
        log(dict(step=step, minutes=minutes, **{f"judge_{k}": v for k, v in result.items()}))
        progress.write(f"step {step}: samples labelled as their class {result['accuracy']:.3f} "
                       f"({result['accuracy_ratio']:.2f} of real), Frechet distance {result['fd']:.1f} "
                       f"({result['fd_ratio']:.3f} of the untrained generator's)")
        eval_seconds += time.time() - tic_judge

    def log(record):
        if main_process:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if "event" in record:
                progress.write(f"step {record['step']}: {record['event']}")

    def state_now():
        rng_states = checkpoint.gather_rng_states(world_size)
        state = checkpoint_state(nets, args, step, loader, rng_states, generator_kwargs, discriminator_kwargs)
        state["fid_tracking"] = [best_fid, evals_since_best]
        state["train_seconds"] = train_seconds()
        if best_d is not None:
            state["best_D"] = best_d
        return state

    def save():
        nonlocal last_saved_step
        state = state_now()
        if main_process and save_checkpoint(state, nets, args.out_dir, args.keep):
            last_saved_step = step

    try:
        if judge is not None and step == 0:
            judge_samples()
        while step < args.max_steps:
            x_d, y_d = next_batch()
            x_g, y_g = next_batch()
            ot_scale = ot_scale_at(step, args.ot_start, args.ot_end, args.ot_decay_steps)
            ema_decay = ema_decay_at(step, args.ema_decay, args.ema_warmup)
            metrics, ok = train_step(nets, args, x_d, y_d, x_g, y_g, ot_scale, autocast, augment, guidance, ema_decay)
            step += 1
            bad_steps = 0 if ok else bad_steps + 1
            if bad_steps >= args.max_bad_steps:
                where = (f"the last good checkpoint is {ckpt_path} (step {last_saved_step})" if last_saved_step
                         is not None else "no checkpoint was written")
                raise Diverged(f"the loss became non-finite: {bad_steps} consecutive steps up to step {step} were "
                               f"skipped; {where}. Lower --lr or resume from the checkpoint")
            pending.append(metrics)

            if step % args.log_every == 0 or step == args.max_steps:
                # One host sync per log interval: average the queued 0-d tensors.
                names = list(pending[0])
                values = torch.stack([torch.stack([m[n].float() for n in names]) for m in pending]).mean(0).tolist()
                elapsed = time.time() - tic
                record = dict(step=step, minutes=train_seconds() / 60, **dict(zip(names, values)), ot_scale=ot_scale,
                              lr_g=nets.opt_g.param_groups[0]["lr"], lr_d=nets.opt_d.param_groups[0]["lr"],
                              img_per_s=(step - tic_step) * args.batch_size / max(elapsed, 1e-9))
                pending, tic, tic_step = [], time.time(), step
                log(record)
                progress.set_postfix(d=f"{record['d_loss']:.3f}", g=f"{record['g_adv']:.3f}",
                                     ot=f"{record['g_ot']:.3f}", img_s=f"{record['img_per_s']:.0f}")
            if main_process and (step % args.sample_every == 0 or step == args.max_steps):
                with torch.no_grad():
                    images = decode(sample(nets.ema, grid_noise, grid_labels, nfe=8 if args.nfe == "any" else args.nfe,
                                           pred=args.pred))
                if images is not None:
                    save_grid(images, os.path.join(args.out_dir, f"samples_{step:08d}.png"), nrow=8)
            if args.ema_reload_every and step % args.ema_reload_every == 0:
                nets.G.load_state_dict(nets.ema.state_dict())  # the weight average is the better equilibrium
                log(dict(step=step, event="EMA reloaded into G"))
            if judge is not None and (step % args.judge_every == 0 or step == args.max_steps):
                judge_samples()
            if args.fid_every and (step % args.fid_every == 0 or step == args.max_steps):
                tic_fid = time.time()
                fid_value = in_loop_fid(nets.ema, args, inception, reference, decode, device, rank, world_size)
                eval_seconds += time.time() - tic_fid
                log(dict(step=step, fid=fid_value, fid_samples=args.fid_samples))
                if best_fid is None or fid_value < best_fid:
                    best_fid, evals_since_best = fid_value, 0
                    if args.d_reload_on_stall:
                        best_d = {k: v.detach().cpu().clone() for k, v in nets.D.state_dict().items()}
                    state = state_now()
                    if main_process:
                        checkpoint.save(state, os.path.join(args.out_dir, "best.pt"))
                else:
                    evals_since_best += 1
                    if args.d_reload_on_stall and evals_since_best >= args.d_reload_on_stall:
                        nets.D.load_state_dict(best_d)
                        evals_since_best = 0
                        log(dict(step=step, event=f"FID stalled for {args.d_reload_on_stall} evaluations: D reloaded "
                                                  f"from the best-FID point (FID {best_fid:.3f})"))
            if args.max_minutes and train_seconds() >= args.max_minutes * 60:
                stop.requested = True  # like a signal: every rank stops at this step, after a checkpoint
            stopping = stop.agreed(device, world_size)
            # never over the last good checkpoint while steps are being skipped
            if (step % args.ckpt_every == 0 or step == args.max_steps or stopping) and bad_steps == 0:
                save()
            progress.update(1)
            if stopping:
                break
    finally:
        progress.close()
        if log_file:
            log_file.close()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return nets


class Diverged(Exception):
    """Too many consecutive non-finite steps (exit code 3)."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--train-classifier" in argv:
        classifier.main([a for a in argv if a != "--train-classifier"])
        return
    args = parse_args(argv)
    try:
        train(args)
    except Diverged as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except (data.DataError, checkpoint.CheckpointError, vae.VAEError, fid.FidError) as e:
        if args.debug:
            raise
        if not (isinstance(e, ArgumentError) and os.environ.get("RANK", "0") != "0"):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
