"""Flow matching: the multi-step baseline that AFM is measured against, on the same network, data and judge.

    python flow_matching.py                                  # Fashion-MNIST, T/7, as `python train.py`
    python sample.py --ckpt fm/ckpt.pt --nfe 4               # 4 Euler steps
    python quality.py --judge judge.pt --ckpt fm/ckpt.pt --nfe 1,2,4,8,16

The objective is rectified flow (Liu et al. 2022; Lipman et al. 2022) in the paper's time convention, t = 0
data and t = 1 noise (eq. 15's linear interpolation):

    x_t  = (1 - t) x + t z,        z ~ N(0, I),  t = sigmoid(n), n ~ N(0, 1)   (logit-normal, SD3's)
                                   (or z from the data-fitted prior of prior.py, with --prior data)
    loss = E || G(x_t, y, t) - (z - x) ||^2 / n                                 (G predicts dx_t/dt)

and K-step sampling integrates dx/dt = G from t = 1 to 0 with Euler steps on linspace(1, 0, K + 1), which is
sample.sample(..., pred="v"): AFM's multi-step update x <- x - (s - t) G (eq. 39) with G a velocity.

G is train.py's Generator with a source-time input (the one a multi-step AFM generator has), trained with
train.py's data loader, EMA, checkpoints, resume, --max-minutes, sample grids and judge. A step is one G
update on one batch: three forward passes' worth of compute per image, against AFM's 14.5 (paper Table 12).
On one core of a 2-core laptop CPU the T/7 preset makes 290-400 steps of 128 images a minute, AFM's 230-300
steps of 32, depending on the host (README, "What a laptop gets").
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import data
import prior
import quality
import train
import vae
from model import MODELS, Generator
from runtime import Diverged, TrainingLog, run, set_precision, setup_distributed
from train import due, ema_decay_at, update_ema

# ------------------------------------------------------------------------------------------------------------
# 1. The objective


def flow_matching_loss(G, x, y, noise_prior=None):
    """x: (N, C, H, W) data, y: (N,) labels -> the mean squared velocity error (a 0-d tensor). noise_prior:
    the run's prior.GaussianPrior (None: N(0, I))."""
    z = torch.randn_like(x) if noise_prior is None else noise_prior.noise_like(x)  # (N, C, H, W) noise
    t = torch.sigmoid(torch.randn(x.shape[0], device=x.device))  # (N,) logit-normal times in (0, 1)
    t_ = t.view(-1, 1, 1, 1)
    x_t = (1 - t_) * x + t_ * z                               # the point at time t on the straight path
    velocity = G(x_t, y, t)                                   # (N, C, H, W)
    return F.mse_loss(velocity, z - x)


# ------------------------------------------------------------------------------------------------------------
# 2. Configuration: train.py's data rows (network, image size, flips, loader), with flow matching's own
# optimisation. The laptop row, measured on the real Fashion-MNIST on the same 2-core CPU and judge as AFM's
# (README, "What a laptop gets"):
#   batch 128, lr 1e-3   AdamW (0.9, 0.999); a regression target has no adversary to keep up with, so the
#                        batch that lowers the gradient's noise pays for itself. Not screened against other
#                        rows yet: two seeds of it reach recall 0.60-0.63 at 8 steps in 30 minutes, near the
#                        0.87 of real images, so it is not a weak baseline
#   EMA 0.999            over about 1,000 steps: two or three minutes at flow matching's step rate
#   grad clip 1
#   intervals            about 400 steps a minute on one core, against AFM's 300: grids and checkpoints every
#                        2x train.py's steps, and the judge, which samples at five step counts, every 4x, so
#                        that judging takes about the share of a run that it takes in train.py
# The imagenet row is SiT's (Ma et al. 2024): batch 256, lr 1e-4, EMA 0.9999; not measured here.
FM_LAPTOP = dict(batch_size=128, lr=1e-3, ema_decay=0.999, ema_warmup=10, grad_clip=1.0, max_steps=100_000)
FM_IMAGENET = dict(batch_size=256, lr=1e-4, ema_decay=0.9999, ema_warmup=0, grad_clip=1.0,
                   max_steps=1_000_000)


def preset(name, row):
    """flow_matching.py's row for --data name, from train.py's row."""
    shared = dict(model=row["model"], image_size=row["image_size"])
    if "num_workers" in row:
        shared["num_workers"] = row["num_workers"]
    if name == "imagenet":
        return dict(shared, ckpt_every=row["ckpt_every"], sample_every=row["sample_every"],
                    log_every=row["log_every"], **FM_IMAGENET)
    return dict(shared, flip=row["flip"], judge_every=4 * row["judge_every"],
                ckpt_every=2 * row["ckpt_every"], sample_every=2 * row["sample_every"],
                log_every=2 * row["log_every"], **FM_LAPTOP)


PRESETS = {name: preset(name, row) for name, row in train.PRESETS.items()}

FIXED_ON_RESUME = ("data", "image_size", "model", "batch_size", "seed", "prior")


def per_source(name, otherwise=""):
    return train.per_source(name, otherwise, presets=PRESETS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a class-conditional flow-matching model (the baseline "
                                            "of AFM) with train.py's network, data and judge.",
                                formatter_class=train.HelpFormatter)
    add = p.add_argument
    add("--data", choices=list(PRESETS), default="fashion-mnist", help="as train.py's --data")
    add("--data-path", help="as train.py's --data-path")
    add("--image-size", type=int, help="pixels " + per_source("image_size"))
    add("--vae", help="sd-vae-ft-mse weights, to encode an ImageNet image folder on the fly")
    add("--model", help=f"one of {', '.join(MODELS)} " + per_source("model"))
    add("--nfe", type=int, default=8, help="Euler steps of the sample grids, and sample.py's default")
    add("--judge-nfe", default="1,2,4,8,16", help="the step counts each judgement samples with")
    add("--batch-size", type=int, help="global batch (default: 128; imagenet 256)")
    add("--lr", type=float, help="AdamW learning rate (default: 1e-3; imagenet 1e-4)")
    add("--weight-decay", type=float, default=0.01)
    add("--ema-decay", type=float, help="(default: 0.999; imagenet 0.9999)")
    add("--ema-warmup", type=int, help="as train.py's (default: 10; imagenet 0)")
    add("--flip", action=argparse.BooleanOptionalAction, help="as train.py's")
    add("--grad-clip", type=float, help="max gradient norm (default: 1)")
    add("--prior", choices=["standard", "data"], default="standard", help="as train.py's --prior")
    add("--max-steps", type=int, help="(default: 100,000; imagenet 1,000,000)")
    add("--max-minutes", type=float, help="also stop after this many minutes of training (judging not "
                                          "counted)")
    add("--out-dir", default="fm")
    add("--resume", action="store_true", help="continue from --out-dir/ckpt.pt; flags given now take effect, "
        "except " + ", ".join("--" + f.replace("_", "-") for f in FIXED_ON_RESUME))
    add("--overwrite", action="store_true", help="as train.py's: start anew in an --out-dir that holds a run")
    add("--seed", type=int, default=0)
    add("--device", help="cuda, mps or cpu (default: the first available)")
    add("--precision", choices=["fp32", "tf32", "bf16"], default="tf32", help="as train.py's")
    add("--num-workers", type=int, help="data-loading worker processes per rank " +
        per_source("num_workers", train.WORKERS_OTHERWISE))
    add("--ckpt-every", type=int, help=per_source("ckpt_every"))
    add("--keep", type=int, default=0, help="also keep the last N step-stamped checkpoints")
    add("--sample-every", type=int, help="write an EMA sample grid every N steps " +
        per_source("sample_every"))
    add("--log-every", type=int, help=per_source("log_every"))
    add("--judge-every", type=int, help="as train.py's " + per_source("judge_every"))
    add("--judge", help="judge file (default: OUT_DIR/judge.pt, trained there on first use)")
    add("--judge-samples", type=int, default=1000, help="samples per judgement and step count")
    add("--max-bad-steps", type=int, default=5,
        help="stop after this many consecutive steps with a non-finite loss or gradient")
    add("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    args.given = checkpoint.flags_given(p, argv)
    for name, value in PRESETS[args.data].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.judge_nfe = [int(k) for k in args.judge_nfe.split(",")]
    except ValueError:
        p.error(f"--judge-nfe takes step counts separated by commas, e.g. 1,2,4; got {args.judge_nfe!r}")
    args.pred = "v"  # what sample.py and quality.py read: G is a velocity
    return args


def validate(args, world_size):
    if args.model not in MODELS:
        raise train.ArgumentError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
    if args.batch_size <= 0 or args.batch_size % world_size:
        raise train.ArgumentError(f"--batch-size {args.batch_size} must be positive and divisible by the "
                                  f"number of processes ({world_size})")
    if min(args.nfe, *args.judge_nfe) < 1:
        raise train.ArgumentError("--nfe and --judge-nfe take positive step counts")
    if args.judge_every and args.data == "imagenet":
        raise train.ArgumentError("--judge-every judges small pixel datasets, not imagenet")


# ------------------------------------------------------------------------------------------------------------
# 3. The loop


def run_state(step, args, G, ema, noise_prior, opt, loader, world_size, generator_kwargs, clock):
    """What fm/ckpt.pt holds: enough to continue bitwise exactly, and what sample.py and quality.py read."""
    return {"objective": "flow matching", "step": step, "config": vars(args),
            "generator_kwargs": generator_kwargs, "G": G.state_dict(), "ema": ema.state_dict(),
            "prior": noise_prior.state_dict(),
            "opt": opt.state_dict(), "data": loader.state_dict(),
            "rng": checkpoint.gather_rng_states(world_size), "train_seconds": clock.seconds()}


def restore(state, G, ema, opt, loader, rank, world_size, args):
    if state.get("objective") != "flow matching":
        raise checkpoint.CheckpointError("--resume: the checkpoint is not a flow_matching.py run")
    checkpoint.load_weights(G, state["G"], what="checkpoint [G]")
    checkpoint.load_weights(ema, state["ema"], what="checkpoint [ema]")
    opt.load_state_dict(state["opt"])
    for group in opt.param_groups:
        group.update(lr=args.lr, weight_decay=args.weight_decay)
    loader.load_state_dict(state["data"])
    if len(state["rng"]) == world_size:
        checkpoint.set_rng_state(state["rng"][rank])


def judge_all(judge, ema, noise_prior, args, step, clock, log):
    """One judgement per --judge-nfe step count, a log line each (train.py's judge_* names, plus nfe)."""
    minutes = clock.seconds() / 60
    with clock.paused():
        for nfe in args.judge_nfe:
            result = judge(ema, nfe=nfe, pred="v", prior=noise_prior)
            log(dict(step=step, minutes=minutes, nfe=nfe, **{f"judge_{k}": v for k, v in result.items()}),
                f"nfe {nfe}: " + quality.describe(result, judge.real_accuracy))


def train_flow_matching(args):
    rank, world_size, device = setup_distributed(args.device)
    given = set(vars(args).pop("given", ()))
    resume_state = None
    if args.resume:
        resume_state = checkpoint.load_training_state(args.out_dir)
        args = argparse.Namespace(**checkpoint.resumed_config(
            resume_state["config"], vars(args), given, FIXED_ON_RESUME))
    validate(args, world_size)
    autocast = set_precision(args.precision, device)
    checkpoint.claim_out_dir(args.out_dir, checkpoint.RUN_FILES, args.resume, args.overwrite, rank,
                             world_size)
    source = vae.open_data(args, rank, world_size, device, flip=args.flip, decoder=True)
    generator_kwargs = dict(MODELS[args.model], input_size=source.input_size, in_channels=source.in_channels,
                            num_classes=source.num_classes, use_t_src=True)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    G = Generator(**generator_kwargs).to(device)
    ema = Generator(**generator_kwargs).to(device).requires_grad_(False).eval()
    ema.load_state_dict(G.state_dict())
    opt = torch.optim.AdamW(G.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    G_train = DDP(G, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else G
    noise_prior = prior.for_run(args.prior, source, args.seed, resume_state).to(device)
    torch.manual_seed(args.seed * 1000 + rank + 1)  # then each rank draws its own noise
    if resume_state is not None:
        restore(resume_state, G, ema, opt, source.loader, rank, world_size, args)
    step = resume_state["step"] if resume_state is not None else 0
    clock = checkpoint.Clock((resume_state or {}).get("train_seconds", 0.0))
    log = TrainingLog(os.path.join(args.out_dir, "log.jsonl"), args.max_steps, step, args.batch_size,
                      main_process=rank == 0)
    judge = None
    if args.judge_every and rank == 0:
        shape = (source.in_channels, source.input_size, source.input_size)
        judge_net = quality.judge_or_train(args.judge or os.path.join(args.out_dir, "judge.pt"), args.data,
                                           args.data_path, source.input_size)
        judge = quality.SampleJudge(*judge_net, shape, args.judge_samples, args.seed)
    if rank == 0:
        n_params = sum(p.numel() for p in G.parameters()) / 1e6
        print(f"flow matching: G {args.model} ({n_params:.1f}M params), {source.size} training samples, "
              f"{world_size} x {device}, batch {args.batch_size}, starting at step {step}")
        checkpoint.write_config(args.out_dir, vars(args))
    stop = checkpoint.StopFlag()
    bad_steps, last_saved_step = 0, step if resume_state is not None else None
    try:
        if judge is not None and step == 0:
            judge_all(judge, ema, noise_prior, args, step, clock, log)
        while step < args.max_steps:
            x, y = source.next_batch()
            with autocast():
                loss = flow_matching_loss(G_train, x, y, noise_prior)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(G.parameters(), args.grad_clip)
            ok = bool(torch.isfinite(loss.detach() + grad_norm))
            if ok:  # a non-finite batch is skipped, as in train.py
                opt.step()
                update_ema(ema, G, ema_decay_at(step, args.ema_decay, args.ema_warmup))
            step += 1
            last = step == args.max_steps
            bad_steps = 0 if ok else bad_steps + 1
            if bad_steps >= args.max_bad_steps:
                raise Diverged(train.divergence_message(bad_steps, step, args.out_dir, last_saved_step))
            log.add(dict(fm_loss=loss.detach(), grad_norm=grad_norm.detach()))
            if due(step, args.log_every, last):
                averages, img_per_s = log.averages(step)
                log(dict(step=step, minutes=clock.seconds() / 60, **averages, lr=opt.param_groups[0]["lr"],
                         img_per_s=img_per_s))
                log.progress.set_postfix(loss=f"{averages['fm_loss']:.4f}", img_s=f"{img_per_s:.0f}")
            if args.max_minutes and clock.seconds() >= args.max_minutes * 60:
                stop.requested = True
            stopping = stop.agreed(device, world_size)
            if rank == 0 and due(step, args.sample_every, last or stopping):
                train.write_progress_grid(ema, noise_prior, args, source, step, device)
            if judge is not None and due(step, args.judge_every, last or stopping):
                judge_all(judge, ema, noise_prior, args, step, clock, log)
            if due(step, args.ckpt_every, last or stopping) and bad_steps == 0:
                state = run_state(step, args, G, ema, noise_prior, opt, source.loader, world_size,
                                  generator_kwargs, clock)
                if rank == 0 and checkpoint.save_training_state(state, [G, ema], args.out_dir,
                                                                args.keep):
                    last_saved_step = step
            log.progress.update(1)
            if stopping:
                break
    finally:
        log.close()
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return G, ema


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    errors = {Diverged: 3, (data.DataError, checkpoint.CheckpointError, vae.VAEError): 2}
    body = checkpoint.reporting_write_errors(os.path.join(args.out_dir, "ckpt.pt"))(
        lambda: train_flow_matching(args))
    code = run(body, args.debug, errors, quiet=train.said_by_rank_0)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
