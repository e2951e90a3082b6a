"""Train an Adversarial Flow Model: the configuration, the networks, the D and G updates, and the loop.

    python train.py                                   # tiny model, Fashion-MNIST, on a laptop CPU or one GPU
    torchrun --nproc_per_node=8 train.py --data imagenet --data-path latents.npy --model XL/2   # the paper

One step is one discriminator update followed by one generator update (paper sec. 3.1; TTUR 1:1), each on its
own data batch of --batch-size images (global, split over ranks):

    D update    losses.discriminator_objective: relativistic loss + w-weighted finite-difference R1/R2
                + logit centering
    G update    losses.generator_objective: relativistic loss through gradnorm.py + lambda_ot * OT loss / w,
                with D frozen (its parameters get no gradients)
    schedule    lambda_ot follows a cosine from --ot-start to --ot-end over --ot-decay-steps, then stays
                (Table 2)

Around them: data.py and vae.open_data (the data), checkpoint.py (run state: ckpt.pt, resume, signals),
recipe.py (Table 11's phases, guidance, reloads, in-loop FID, the sample judge), runtime.py (processes,
devices, exit codes and the log).

Under torchrun each rank runs this same file; DDP averages gradients only where a network is being updated:
the D update goes through DDP(D), the G update through DDP(G), and the frozen or no_grad calls use the plain
modules. Rank 0 alone writes files.
"""

import argparse
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import classifier
import data
import fid
import losses
import prior
import recipe
import vae
from gradnorm import GradientNormalization
from model import MODELS, Discriminator, Generator
from recipe import ArgumentError
from runtime import Diverged, TrainingLog, run, set_precision, setup_distributed
from sample import grid_labels, sample_images, write_grid

# ------------------------------------------------------------------------------------------------------------
# 1. Configuration. A flag left unset takes, in this order: its --phase row (recipe.TABLE_11), its --data row
# below, then paper_defaults() (the paper's values, some depending on --nfe). --help shows each row's value.

# The laptop presets: a tiny DiT (4 blocks of width 128, 1.2M parameters) that cuts 28-px images into 4 x 4
# tokens of 7 x 7 pixels (T/7), 32-px ones into 4 x 4 tokens of 8 x 8 (T/8). Chosen from measured runs on the
# real Fashion-MNIST (docs/laptop.md; all but the prior and lambda_ot lines were measured with N(0, I) noise).
# A laptop runs a few thousand steps where the paper runs 500,000, so they depart from the paper's row below:
#   T/7, T/8             16 tokens: three times the steps per minute of T/4's 49, and the extra steps are what
#                        let the samples of one class start to differ (T/4 drew one garment per class).
#   lr 2e-3 (D)          20x the paper's 1e-4: the class embeddings start at N(0, 0.02) and the adaLN weights
#                        at zero, so class conditioning grows roughly with lr^2. Measured with G at the same
#                        rate: 5e-4 and 1e-3 were slower per minute, 3e-3 no faster.
#   g_lr 1e-3 (G)        half of D's: the samples of a class then differ more in shape (bags with and without
#                        handles, T-shirts of several prints). Distance ratio over minutes 27-30, G at 1e-3
#                        against 2e-3: 0.080-0.114 and 0.080-0.106 (two seeds) against 0.115-0.146 on both
#                        cores, 0.103-0.112 against 0.137-0.194 on one; class accuracy is a little slower in
#                        the first 10 minutes.
#   EMA 0.99, warm-up 10 the EMA decays at min(0.99, (1 + step) / (10 + step)), so it never holds the random
#                        start; the paper's 0.9999 would average over 10,000 steps a laptop never takes.
#   prior data           the noise is a Gaussian fitted to the training images (prior.py), not N(0, I): a
#                        class then draws many garments at one step, not one (recall 0.42, not 0.02).
#   lambda_ot 0.1        throughout, so that the pull towards z lasts (decayed 0.1 -> 0.01 over 8,000 steps,
#                        recall fell back to 0.21; with N(0, I) the row was 0.05 -> 0.005 over 500 steps).
#   lambda_gp 0.05       T/4, one run each: 0.81 of A_real after 8 minutes; the paper's 0.25: 0.72; 1.0: 0.79.
#   D augmentation       every real/fake pair is shifted by the same random -2..2 pixels before D (sec. 3.9's
#                        paired augmentation, translation only): the seams between G's patches then fall
#                        inside D's patches, where D sees them. Without it the samples are blocky.
#   batch 32             28-px Fashion-MNIST runs 200-260 steps a minute on one core of a 2-core CPU (360-420
#                        on both). With G at 2e-3, batch 128 learnt more slowly for 10 minutes; at 30 its
#                        distance ratio was 0.086 in one run, 0.15 and 0.14 (at 27 minutes) in two more,
#                        against 0.137 for batch 32.
#   --nfe 2              takes the same row (G then predicts velocities). 30 minutes on one core, two seeds:
#                        Frechet ratio 0.097 and 0.145 against flow matching's two steps 0.104 and 0.097,
#                        recall 0.25 and 0.24 against one step's 0.04. The paper's multi-step lambda_ot
#                        (0.25, here decayed over 3,000 steps) learnt more slowly and diverged at 6,700
#                        steps. --nfe 4 had learnt 0.24 and 0.17 of A_real in 10 minutes on two hosts, with
#                        D's loss near log 2 throughout (it hardly tells real from fake): no laptop setting.
# The MNISTs are 28 px (no padding) and never flipped (a mirrored digit is not a digit). A folder is not
# flipped either unless --flip, since it may hold digits or text: on 5,000 real digits saved as 32-px PNGs,
# flips cut the sample accuracy at 10 minutes on one core from 0.60 to 0.20 of A_real. Loader processes
# (data.default_workers, unless --num-workers): none for in-memory datasets and folders of images up to 64 px;
# one for a folder of larger images, to decode while the model trains (a 500 x 375 JPEG takes 2-3.6 ms to
# decode and shrink to 32 px, so a step's 64 real images take about as long as the step itself). A 28-px
# digit decodes in 0.1 ms, and there a worker only competes for the two cores (410 steps a minute without,
# 340 with one).
# The judge (quality.py) labels samples every judge_every steps: on by default for the MNISTs, whose judge
# trains in a minute; --judge-every N turns it on for CIFAR-10 and folders (it trains on the whole set first).
LAPTOP = dict(batch_size=32, lr=2e-3, g_lr=1e-3, max_steps=20_000, ema_decay=0.99, ema_warmup=10,
              prior="data", ot_start=0.1, ot_end=0.1, ot_decay_steps=500, gp_scale=0.05, augment_p=1.0,
              augment_translate=0.08, augment_cutouts=0, ckpt_every=1000, sample_every=500, log_every=50)

PRESETS = {
    "fashion-mnist": dict(LAPTOP, model="T/7", image_size=28, flip=False, judge_every=250),
    "mnist": dict(LAPTOP, model="T/7", image_size=28, flip=False, judge_every=250),
    "cifar10": dict(LAPTOP, model="T/8", image_size=32, flip=True, judge_every=0),
    "folder": dict(LAPTOP, model="T/8", image_size=32, flip=False, judge_every=0),
    # The paper (Table 10/11, phase 1): XL/2 on SD-VAE latents, batch 256, lr 1e-4, EMA 0.9999, lambda_ot
    # decayed over 100 epochs = 1M alternating iterations = 500k of our D+G steps.
    "imagenet": dict(model="XL/2", image_size=256, batch_size=256, lr=1e-4, max_steps=1_000_000,
                     ema_decay=0.9999, ot_decay_steps=500_000, ckpt_every=5000, sample_every=5000,
                     log_every=100, num_workers=8),
}


def paper_defaults(nfe, repeat):
    """What a data row leaves unset: the paper's values. Multi-step generators predict velocities and start
    lambda_ot at 0.25; multi-step and deep ones clip gradients at 5 (the authors' configs), 1-NFE ones at 50.
    The recipe's flags are off."""
    multi_step = nfe != 1
    return dict(pred="v" if multi_step else "x", ot_start=0.25 if multi_step else 0.2, ot_end=0.005,
                gp_scale=0.25, grad_clip=5.0 if multi_step or repeat > 1 else 50.0, ema_warmup=0, flip=True,
                prior="standard", **recipe.defaults(nfe))


# What the weights, the data position or the random streams depend on: a resumed run cannot change these.
# Every other flag given with --resume takes effect (learning rates, schedules, guidance, logging, ...).
FIXED_ON_RESUME = ("data", "image_size", "model", "nfe", "pred", "repeat", "batch_size", "seed", "phase",
                   "init_from", "d_reload", "prior")


# The --num-workers default of the rows that set none (data.default_workers), for --help.
WORKERS_OTHERWISE = f"0, or 1 for a folder of images over {data.SMALL_IMAGE_SIDE} px"


def per_source(name, otherwise="", presets=PRESETS):
    """'(default: cifar10 2e-4, ..., imagenet 1e-4)' for a flag the --data rows set, for --help."""
    values = [f"{source} {row[name]}" for source, row in presets.items() if name in row]
    others = [source for source, row in presets.items() if name not in row]
    tail = f"; {', '.join(others)}: {otherwise}" if others and otherwise else ""
    return f"(default: {', '.join(values)}{tail})"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows argparse's default where there is one; a flag whose default comes from a table says so itself."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train an Adversarial Flow Model. One step = one D update + one G update, each on a "
                    "batch of --batch-size images (global, over all ranks).",
        formatter_class=HelpFormatter)
    add = p.add_argument
    add("--data", choices=list(PRESETS), default="fashion-mnist",
        help="fashion-mnist, mnist, cifar10: downloaded to ./data once (Debian's dataset-fashion-mnist is "
             "found too); folder: root/<class>/<image>; imagenet: a latents .npy from `python vae.py` or an "
             "image folder encoded with --vae")
    add("--data-path", help="dataset location (the MNISTs: the folder of the four IDX files; cifar10: the "
                            "folder of the archive or of cifar-10-batches-py/)")
    add("--image-size", type=int, help="pixels " + per_source("image_size"))
    add("--vae", help="sd-vae-ft-mse weights, to encode an ImageNet image folder on the fly")
    add("--model", help=f"one of {', '.join(MODELS)} " + per_source("model"))
    add("--nfe", default="1", help="generator steps: 1, 2, 4, ... or 'any'")
    add("--pred", choices=["x", "v"], help="G predicts x_t (x) or a velocity (v) (default: x for 1 NFE, v "
        "otherwise, as in the paper)")
    add("--repeat", type=int, default=1, help="depth repetition of G's blocks (2 -> 56, 4 -> 112 layers for "
        "XL/2); the imagenet preset and the phases give G --lr divided by it")
    add("--batch-size", type=int,
        help="global batch for each of the D and G updates " + per_source("batch_size"))
    add("--lr", type=float, help="AdamW learning rate of D " + per_source("lr"))
    add("--g-lr", type=float, help="AdamW learning rate of G " + per_source("g_lr", "--lr / --repeat") +
        "; with --phase: --lr / --repeat")
    add("--weight-decay", type=float, default=0.01, help="AdamW weight decay of G and D")
    add("--ema-decay", type=float, help=per_source("ema_decay"))
    add("--ema-warmup", type=int, help="the EMA decays at min(--ema-decay, (1 + step) / (warmup + step)), so "
        "it forgets the random start within a few steps " + per_source("ema_warmup", "0, off, as the paper"))
    add("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips of the training "
        "images (default: on for cifar10 and imagenet; off for mnist and fashion-mnist, whose mirrored "
        "digits and shoes are not in the data, and for folder, which may hold digits or text: --flip for "
        "photos)")
    add("--prior", choices=["standard", "data"], help="the flow's noise: N(0, I) as in the paper, or a "
        "Gaussian with the training data's mean and covariance (prior.py) " +
        per_source("prior", "standard; with --phase or classifier guidance: standard"))
    add("--grad-clip", type=float, help="max gradient norm (default 50 for 1-NFE, 5 for multi-step and deep "
        "generators, as the authors' configs)")
    add("--ot-start", type=float,
        help="lambda_ot at step 0 " + per_source("ot_start", "0.2; 0.25 multi-step"))
    add("--ot-end", type=float, help="lambda_ot after the cosine decay " + per_source("ot_end", "0.005"))
    add("--ot-decay-steps", type=int,
        help="length of the cosine decay, in steps " + per_source("ot_decay_steps"))
    add("--gp-scale", type=float,
        help="lambda_gp of the R1 and R2 penalties " + per_source("gp_scale", "0.25"))
    add("--gp-eps", type=float, default=0.01, help="finite-difference step of R1/R2")
    add("--gp-ratio", type=float, default=0.25, help="fraction of the batch that gets R1/R2")
    add("--cp-scale", type=float, default=0.01, help="lambda_cp of the logit-centering penalty")
    add("--max-steps", type=int, help=per_source("max_steps"))
    add("--max-minutes", type=float,
        help="also stop after this many minutes of training (judging and FID not counted)")
    add("--out-dir", default="out")
    add("--resume", action="store_true", help="continue from --out-dir/ckpt.pt; flags given now take effect, "
        "except " + ", ".join("--" + f.replace("_", "-") for f in FIXED_ON_RESUME))
    add("--overwrite", action="store_true", help="start a new run in an --out-dir that holds one: delete its "
        "checkpoints, log and sample grids first (without it, such a run is refused)")
    add("--seed", type=int, default=0)
    add("--device", help="cuda, mps or cpu (default: the first available)")
    add("--precision", choices=["fp32", "tf32", "bf16"], default="tf32", help="CUDA matmul precision; bf16 "
        "is autocast and opt-in (the paper trains in TF32). CPU always runs fp32")
    add("--compile", action="store_true", help="torch.compile G and D")
    add("--num-workers", type=int, help="data-loading worker processes per rank " +
        per_source("num_workers", WORKERS_OTHERWISE))
    add("--ckpt-every", type=int, help=per_source("ckpt_every"))
    add("--keep", type=int, default=0, help="also keep the last N step-stamped checkpoints")
    add("--sample-every", type=int,
        help="write an EMA sample grid every N steps " + per_source("sample_every"))
    add("--log-every", type=int, help=per_source("log_every"))
    add("--max-bad-steps", type=int, default=5,
        help="stop after this many consecutive steps with a non-finite loss or gradient")
    add("--train-classifier", action="store_true", help="an alias of `python classifier.py`: train the "
        "time-conditioned classifier for flow-based guidance instead, with the other flags passed on (see "
        "`python classifier.py --help`)")
    add("--debug", action="store_true", help="show tracebacks for errors")
    recipe.add_arguments(p)
    args = p.parse_args(argv)
    args.given = checkpoint.flags_given(p, argv)  # on --resume, these override the checkpoint's configuration
    try:
        args.nfe = "any" if args.nfe == "any" else int(args.nfe)
    except ValueError:
        p.error(f"--nfe must be a positive integer or 'any', got {args.nfe!r}")
    model = args.model or PRESETS[args.data]["model"]
    phase = recipe.phase_preset(args.phase, args.nfe, args.repeat, model) if args.phase else {}
    data_row = PRESETS[args.data]
    if args.phase:  # the paper's G rate, --lr / --repeat (below), over any data row's own
        data_row = {name: value for name, value in data_row.items() if name != "g_lr"}
    for preset in (phase, data_row, paper_defaults(args.nfe, args.repeat)):
        for name, value in preset.items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)
    args.g_lr = args.g_lr or args.lr / args.repeat
    if args.cg_scale > 0 and "prior" not in args.given:  # the guidance classifier trains on N(0, I) noise
        args.prior = "standard"
    return args


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
    if args.prior == "data" and args.cg_scale > 0:
        raise ArgumentError("--prior data with classifier guidance is not supported: classifier.py trains "
                            "its classifier on N(0, I) noise; drop --prior data")
    recipe.validate(args)


# ------------------------------------------------------------------------------------------------------------
# 2. The networks


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
    d_params: list       # D's trainable parameters, frozen in the G update (the fixed pos_embed is not one)
    noise_prior: prior.GaussianPrior = field(default_factory=prior.GaussianPrior)  # --prior: the flow's noise


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
    adamw = dict(betas=(0.0, 0.9), eps=1e-8, weight_decay=args.weight_decay, fused=fused)
    opt_g = torch.optim.AdamW(g_params, lr=args.g_lr, **adamw)
    opt_d = torch.optim.AdamW(d_params, lr=args.lr, **adamw)

    def wrap(module, sync):
        if sync and distributed:
            module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(module) if args.compile else module

    return Nets(G, D, ema, gradnorm, opt_g, opt_d, G_train=wrap(G, True), G_frozen=wrap(G, False),
                D_train=wrap(D, True), D_frozen=wrap(D, False), d_params=d_params)


# ------------------------------------------------------------------------------------------------------------
# 3. The D and G updates


def ot_scale_at(step, start, end, decay_steps):
    """Cosine from start to end over decay_steps, then constant (sec. 3.2, Table 2)."""
    progress = min(step / max(decay_steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(step, decay, warmup):
    """min(decay, (1 + step) / (warmup + step)): an average over about step / warmup of the steps so far,
    until that reaches the set decay. A short run's EMA then holds no trace of the random initial weights."""
    return min(decay, (1 + step) / (warmup + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def d_update(nets, args, x, y, autocast, augment=None):
    """One discriminator update. G runs under no_grad; D sees real, fake and the perturbed subsets in one
    forward. Returns (metrics, finite)."""
    with autocast():
        loss, metrics = losses.discriminator_objective(
            nets.G_frozen, nets.D_train, x, y, nfe=args.nfe, pred=args.pred, gp_scale=args.gp_scale,
            cp_scale=args.cp_scale, gp_eps=args.gp_eps, gp_ratio=args.gp_ratio, augment=augment,
            prior=nets.noise_prior)
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
                ot_scale=ot_scale, augment=augment, guidance=guidance, prior=nets.noise_prior)
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


def train_step(nets, args, x_d, y_d, x_g, y_g, ot_scale, autocast, augment=None, guidance=None,
               ema_decay=None):
    """One step = one D update, then one G update, on independent batches. Returns (metrics, both finite).

    A non-finite loss or gradient skips that update, so a single bad batch cannot poison the weights; train()
    stops after --max-bad-steps consecutive bad steps. Checking needs one host sync per update: the price of
    never applying a NaN.
    """
    d_metrics, d_ok = d_update(nets, args, x_d, y_d, autocast, augment)
    g_metrics, g_ok = g_update(nets, args, x_g, y_g, ot_scale, autocast, augment, guidance, ema_decay)
    return {**d_metrics, **g_metrics}, d_ok and g_ok


# ------------------------------------------------------------------------------------------------------------
# 4. The loop


def due(step, every, last):
    return step % every == 0 or last


def log_metrics(log, step, minutes, nets, ot_scale):
    """One log.jsonl line: the metrics averaged since the last one, the schedules, and the speed."""
    averages, img_per_s = log.averages(step)
    record = dict(step=step, minutes=minutes, **averages, ot_scale=ot_scale,
                  lr_g=nets.opt_g.param_groups[0]["lr"], lr_d=nets.opt_d.param_groups[0]["lr"],
                  img_per_s=img_per_s)
    log(record)
    log.progress.set_postfix(d=f"{record['d_loss']:.3f}", g=f"{record['g_adv']:.3f}",
                             ot=f"{record['g_ot']:.3f}", img_s=f"{img_per_s:.0f}")


def resumed_args(args, given):
    """--resume: the checkpoint's flags, except those typed now. -> (args, the checkpoint's state)."""
    state = checkpoint.load_training_state(args.out_dir)
    resumed = argparse.Namespace(**checkpoint.resumed_config(
        state["config"], vars(args), given, FIXED_ON_RESUME))
    if "lr" in given and "g_lr" not in given:  # G's learning rate keeps its ratio to D's
        resumed.g_lr = state["config"]["g_lr"] * resumed.lr / state["config"]["lr"]
    return resumed, state


def write_progress_grid(ema, noise_prior, args, source, step, device):
    """An EMA sample grid, a row of 8 per class, with the noise of sample indices 0, 1, ... (the same at every
    step)."""
    if source.in_channels == 4 and source.autoencoder is None:
        return  # latents without --vae cannot be decoded
    labels = grid_labels(ema.num_classes)
    images = sample_images(ema, source.decode, np.arange(len(labels)), labels, args.seed,
                           8 if args.nfe == "any" else args.nfe, args.pred, device, noise_prior)
    write_grid(images, os.path.join(args.out_dir, f"samples_{step:08d}.png"), nrow=8)


def start(args, rank, world_size, device, resume_state):
    """The data, and the networks where they start: a resumed run, a previous phase (--init-from), or scratch.
    -> (source, nets, network kwargs)."""
    checkpoint.claim_out_dir(args.out_dir, checkpoint.RUN_FILES, args.resume, args.overwrite, rank,
                             world_size)
    np.random.seed(args.seed)
    random.seed(args.seed)
    source = vae.open_data(args, rank, world_size, device, flip=args.flip, decoder=True)
    kwargs = network_kwargs(args, source.in_channels, source.input_size, source.num_classes)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    nets = build_nets(args, *kwargs, device, distributed=world_size > 1)
    nets.noise_prior = prior.for_run(args.prior, source, args.seed, resume_state).to(device)
    torch.manual_seed(args.seed * 1000 + rank + 1)  # then each rank draws its own noise
    if resume_state is not None:
        checkpoint.restore(nets, resume_state, source.loader, rank, world_size, args)
    else:
        recipe.start(nets, args)
    return source, nets, kwargs


def announce(args, nets, source, world_size, device, step):
    """What runs: a line on the console, and the full configuration in the console and in config.json."""
    n_params = sum(p.numel() for p in nets.G.parameters()) / 1e6
    print(f"G {args.model} ({n_params:.1f}M params), {source.size} training samples, "
          f"{world_size} x {device}, global batch {args.batch_size}, starting at step {step}")
    print("config: " + json.dumps(vars(args)))
    checkpoint.write_config(args.out_dir, vars(args))


def train(args):
    rank, world_size, device = setup_distributed(args.device)
    given = set(vars(args).pop("given", ()))
    args, resume_state = resumed_args(args, given) if args.resume else (args, None)
    validate(args, world_size)
    autocast = set_precision(args.precision, device)
    source, nets, kwargs = start(args, rank, world_size, device, resume_state)
    step = resume_state["step"] if resume_state is not None else 0
    last_saved_step = step if resume_state is not None else None
    bad_steps = 0
    clock = checkpoint.Clock((resume_state or {}).get("train_seconds", 0.0))
    augment = recipe.make_augment(args)
    guidance = recipe.make_guidance(args, device)
    log = TrainingLog(os.path.join(args.out_dir, "log.jsonl"), args.max_steps, step, args.batch_size,
                      main_process=rank == 0)

    def run_state():
        extra = {**extras.state(), "train_seconds": clock.seconds()}
        return checkpoint.training_state(nets, args, step, source.loader, world_size, kwargs, extra)

    shape = (source.in_channels, source.input_size, source.input_size)
    extras = recipe.Recipe(args, nets, shape, source.decode, device, rank, world_size, resume_state, log,
                           run_state, clock)
    if rank == 0:
        announce(args, nets, source, world_size, device, step)
    stop = checkpoint.StopFlag()
    try:
        extras.at_start(step)
        while step < args.max_steps:
            x_d, y_d = source.next_batch()
            x_g, y_g = source.next_batch()
            ot_scale = ot_scale_at(step, args.ot_start, args.ot_end, args.ot_decay_steps)
            ema_decay = ema_decay_at(step, args.ema_decay, args.ema_warmup)
            metrics, ok = train_step(nets, args, x_d, y_d, x_g, y_g, ot_scale, autocast, augment, guidance,
                                     ema_decay)
            step += 1
            last = step == args.max_steps
            bad_steps = 0 if ok else bad_steps + 1
            if bad_steps >= args.max_bad_steps:
                raise Diverged(divergence_message(bad_steps, step, args.out_dir, last_saved_step))
            log.add(metrics)
            if due(step, args.log_every, last):
                log_metrics(log, step, clock.seconds() / 60, nets, ot_scale)
            if args.max_minutes and clock.seconds() >= args.max_minutes * 60:
                stop.requested = True  # like a signal: every rank stops at this step, after a checkpoint
            stopping = stop.agreed(device, world_size)
            if rank == 0 and due(step, args.sample_every, last or stopping):
                write_progress_grid(nets.ema, nets.noise_prior, args, source, step, device)
            extras.after_step(step, last, stopping)
            # never over the last good checkpoint while steps are being skipped
            if due(step, args.ckpt_every, last or stopping) and bad_steps == 0:
                state = run_state()
                saved = rank == 0 and checkpoint.save_training_state(state, [nets.G, nets.D, nets.ema],
                                                                     args.out_dir, args.keep)
                if saved:
                    last_saved_step = step
            log.progress.update(1)
            if stopping:
                break
    finally:
        log.close()
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return nets


def divergence_message(bad_steps, step, out_dir, last_saved_step):
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    where = "no checkpoint was written"
    if last_saved_step is not None:
        where = f"the last good checkpoint is {ckpt_path} (step {last_saved_step})"
    return (f"the loss became non-finite: {bad_steps} consecutive steps up to step {step} were skipped; "
            f"{where}. Lower --lr or resume from the checkpoint")


def said_by_rank_0(error):
    """Bad flags: every rank raises the same ArgumentError; rank 0 alone prints it."""
    return isinstance(error, ArgumentError) and os.environ.get("RANK", "0") != "0"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--train-classifier" in argv:
        classifier.main([a for a in argv if a != "--train-classifier"])
        return
    args = parse_args(argv)
    errors = {Diverged: 3, (data.DataError, checkpoint.CheckpointError, vae.VAEError, fid.FidError): 2}
    body = checkpoint.reporting_write_errors(os.path.join(args.out_dir, "ckpt.pt"))(lambda: train(args))
    code = run(body, args.debug, errors, quiet=said_by_rank_0)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
