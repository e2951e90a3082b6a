"""Train an Adversarial Flow Model: the networks, the D and G updates, and the loop that any objective uses.

    python train.py                                   # tiny model, Fashion-MNIST, on a laptop CPU or one GPU
    torchrun --nproc_per_node=8 train.py --data imagenet --data-path latents.npy --model XL/2   # the paper

One step is one discriminator update followed by one generator update (paper sec. 3.1; TTUR 1:1), each on its
own data batch of --batch-size images (global, split over ranks):

    D update    losses.discriminator_objective: relativistic loss + w-weighted finite-difference R1/R2
                + logit centering
    G update    losses.generator_objective: relativistic loss through gradnorm.py + lambda_ot * OT loss / w,
                with D frozen (its parameters get no gradients)
    schedule    lambda_ot follows a cosine from --ot-start to --ot-end over --ot-decay-steps (Table 2)

config.py says where each value comes from, recipe.py holds the rest of Table 11 (guidance, reloads, the
in-loop FID), checkpoint.py the run's files. Under torchrun each rank runs this file; DDP averages gradients
only in the update of the network being trained (DDP(D) in the D update, DDP(G) in the G update; the frozen
and no_grad calls use the plain modules). Rank 0 alone writes files.
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
import config
import data
import fid
import losses
import prior
import quality
import recipe
import vae
from config import ArgumentError
from gradnorm import GradientNormalization
from model import MODELS, Discriminator, Generator
from runtime import Diverged, TrainingLog, run, set_precision, setup_distributed
from sample import write_progress_grid

# ------------------------------------------------------------------------------------------------------------
# 1. Configuration: AFM's flags. Their values, and the rule that picks them, are in config.py.

# What the weights, the data position or the random streams depend on: --resume cannot change these.
FIXED_ON_RESUME = ("data", "image_size", "model", "nfe", "pred", "repeat", "batch_size", "seed", "phase",
                   "init_from", "d_reload", "prior")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train an Adversarial Flow Model. One step = one D update + one G update, each on a "
                    "batch of --batch-size images (global, over all ranks). Values: config.py.",
        formatter_class=config.HelpFormatter)
    paper, laptop = config.paper_row(1, 1), config.LAPTOP
    config.add_run_arguments(p, paper, laptop, "out", FIXED_ON_RESUME)
    shown = config.shown_with(paper, laptop)
    add = p.add_argument
    add("--nfe", default="1", help="generator steps: 1, 2, 4, ... or 'any'")
    add("--pred", choices=["x", "v"], help="G predicts x_t (x) or a velocity (v) (default: x for 1 NFE, v "
        "otherwise, as in the paper)")
    add("--repeat", type=int, default=1, help="depth repetition of G's blocks (2 -> 56, 4 -> 112 layers for "
        "XL/2)")
    add("--g-lr", type=float, help="AdamW learning rate of G (paper and --phase: --lr / --repeat; laptop "
        f"{laptop['g_lr']})")
    add("--compile", action="store_true", help="torch.compile G and D")
    add("--ot-start", type=float, help=shown("ot_start", "lambda_ot at step 0 (multi-step paper: 0.25)"))
    add("--ot-end", type=float, help=shown("ot_end", "lambda_ot after the cosine decay"))
    add("--ot-decay-steps", type=int, help=shown("ot_decay_steps", "length of the cosine decay, in steps"))
    add("--gp-scale", type=float, help=shown("gp_scale", "lambda_gp of the R1 and R2 penalties"))
    add("--gp-eps", type=float, help=shown("gp_eps", "finite-difference step of R1/R2"))
    add("--gp-ratio", type=float, help=shown("gp_ratio", "fraction of the batch that gets R1/R2"))
    add("--cp-scale", type=float, help=shown("cp_scale", "lambda_cp of the logit-centering penalty"))
    add("--train-classifier", action="store_true", help="run `python classifier.py` instead, with the other "
        "flags: the time-conditioned classifier of flow-based guidance")
    recipe.add_arguments(p)
    args = p.parse_args(argv)
    try:
        args.nfe = "any" if args.nfe == "any" else int(args.nfe)
    except ValueError:
        p.error(f"--nfe must be a positive integer or 'any', got {args.nfe!r}")
    args.given = checkpoint.flags_given(p, argv)  # on --resume, these override the checkpoint's configuration
    model = args.model or config.DATA[args.data]["model"]
    phase = config.phase_row(args.phase, args.nfe, args.repeat, model) if args.phase else None
    rows = config.run_rows(args, config.paper_row(args.nfe, args.repeat), laptop, phase)
    args.sources = config.resolve(args, args.given, rows)
    args.g_lr = args.g_lr or args.lr / args.repeat
    return args


def validate(args, world_size):
    config.validate_run(args, world_size)
    if args.nfe != "any" and args.nfe < 1:
        raise ArgumentError(f"--nfe must be a positive integer or 'any', got {args.nfe}")
    if args.repeat < 1 or (args.repeat > 1 and args.nfe != 1):
        raise ArgumentError("--repeat needs a 1-NFE generator (--nfe 1) and must be >= 1")
    if args.prior == "data" and args.cg_scale > 0:
        raise ArgumentError("classifier guidance needs --prior standard: classifier.py trains its classifier "
                            "on N(0, I) noise")
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
# 4. AFM as the loop drives it. flow_matching.py's FlowMatching answers the same calls for its objective.


class AFM:
    """The networks, one training step, what ckpt.pt keeps of them, and the paper's recipe around the step
    (recipe.py): discriminator augmentation, classifier guidance, EMA reloads and the in-loop FID."""
    name = "AFM"
    parse_args, validate = staticmethod(parse_args), staticmethod(validate)
    fixed_on_resume = FIXED_ON_RESUME
    progress = dict(d="d_loss", g="g_adv", ot="g_ot")  # the progress bar's averages

    def __init__(self, args, source, device, rank, world_size, resume_state):
        self.args, self.decode, self.device, self.rank, self.world_size = args, source.decode, device, rank, \
            world_size
        self.kwargs = network_kwargs(args, source.in_channels, source.input_size, source.num_classes)
        self.nets = build_nets(args, *self.kwargs, device, distributed=world_size > 1)
        self.G, self.ema = self.nets.G, self.nets.ema
        self.noise_prior = self.nets.noise_prior = prior.for_run(args.prior, source, args.seed,
                                                                 resume_state).to(device)
        self.modules = [self.G, self.nets.D, self.ema]  # never saved with non-finite weights
        self.judge_nfe = [8 if args.nfe == "any" else args.nfe]
        if resume_state is not None:
            self.load_state_dict(resume_state)
        else:
            recipe.start(self.nets, args)  # --init-from, --d-reload
        self.augment = recipe.make_augment(args)
        self.guidance = recipe.make_guidance(args, device)
        self.fid = recipe.BestFid(args, device, resume_state)

    def step(self, step, source, autocast):
        """One D update and one G update, each on its own batch -> (metrics, both finite)."""
        x_d, y_d = source.next_batch()
        x_g, y_g = source.next_batch()
        args = self.args
        self.ot_scale = ot_scale_at(step, args.ot_start, args.ot_end, args.ot_decay_steps)
        ema_decay = ema_decay_at(step, args.ema_decay, args.ema_warmup)
        return train_step(self.nets, args, x_d, y_d, x_g, y_g, self.ot_scale, autocast, self.augment,
                          self.guidance, ema_decay)

    def log_fields(self):
        return dict(ot_scale=self.ot_scale, lr_g=self.nets.opt_g.param_groups[0]["lr"],
                    lr_d=self.nets.opt_d.param_groups[0]["lr"])

    def state_dict(self):
        nets = self.nets
        return {"generator_kwargs": self.kwargs[0], "discriminator_kwargs": self.kwargs[1],
                "G": nets.G.state_dict(), "ema": nets.ema.state_dict(), "D": nets.D.state_dict(),
                "gradnorm": nets.gradnorm.state_dict(), "opt_g": nets.opt_g.state_dict(),
                "opt_d": nets.opt_d.state_dict(), **self.fid.state()}

    def load_state_dict(self, state):
        """The networks and optimizers of a checkpoint, then the learning rates and weight decay of args,
        which --resume may have changed (an optimizer's state_dict carries its own)."""
        checkpoint.load_networks(self.nets, state, "checkpoint")
        for optimizer, name, lr in ((self.nets.opt_g, "opt_g", self.args.g_lr),
                                    (self.nets.opt_d, "opt_d", self.args.lr)):
            optimizer.load_state_dict(state[name])
            for group in optimizer.param_groups:
                group.update(lr=lr, weight_decay=self.args.weight_decay)

    def after_step(self, step, last, log, clock):
        """Table 11's reloads and the in-loop FID -> True at a new best FID (the loop then writes best.pt)."""
        args = self.args
        if args.ema_reload_every and step % args.ema_reload_every == 0:
            self.G.load_state_dict(self.ema.state_dict())  # the average is the better equilibrium
            log(dict(step=step, event="EMA reloaded into G"))
        if not (args.fid_every and (step % args.fid_every == 0 or last)):
            return False
        with clock.paused():
            value = recipe.in_loop_fid(self.ema, self.noise_prior, args, self.fid, self.decode, self.device,
                                       self.rank, self.world_size)
        log(dict(step=step, fid=value, fid_samples=args.fid_samples))
        return self.fid.track(step, value, self.nets.D, log)


# ------------------------------------------------------------------------------------------------------------
# 5. The loop, for any objective


def train(args, Objective=AFM):
    """Train Objective (AFM, or flow_matching.FlowMatching) with args -> the trained objective."""
    rank, world_size, device = setup_distributed(args.device)
    given, sources = vars(args).pop("given", set()), vars(args).pop("sources", {})
    args, resume_state = checkpoint.resume(args, given, Objective.fixed_on_resume)
    Objective.validate(args, world_size)
    config.check_model_and_data(args)
    autocast = set_precision(args.precision, device)
    source, objective = start(args, Objective, rank, world_size, device, resume_state)
    step = resume_state["step"] if resume_state is not None else 0
    last_saved_step = step if resume_state is not None else None
    bad_steps = 0
    clock = checkpoint.Clock((resume_state or {}).get("train_seconds", 0.0))
    log = TrainingLog(os.path.join(args.out_dir, "log.jsonl"), args.max_steps, step, args.batch_size,
                      main_process=rank == 0)
    judge = quality.judge_for_run(args, source) if rank == 0 and args.judge_every else None
    if rank == 0:
        announce(args, objective, source, world_size, device, step,
                 {name: "typed" for name in given} if args.resume else sources)

    def run_state():  # what ckpt.pt holds; every rank calls it (the random streams are gathered on rank 0)
        return {"step": step, "config": vars(args), **objective.state_dict(),
                "prior": objective.noise_prior.state_dict(), "data": source.loader.state_dict(),
                "rng": checkpoint.gather_rng_states(world_size), "train_seconds": clock.seconds()}

    stop = checkpoint.StopFlag()
    try:
        if judge is not None and step == 0:
            judge_samples(judge, objective, args, step, clock, log)
        while step < args.max_steps:
            metrics, ok = objective.step(step, source, autocast)
            step += 1
            last = step == args.max_steps
            bad_steps = 0 if ok else bad_steps + 1
            if bad_steps >= args.max_bad_steps:
                raise Diverged(Diverged.message(bad_steps, step, args.out_dir, last_saved_step))
            log.add(metrics)
            if due(step, args.log_every, last):
                log_metrics(log, step, clock.seconds() / 60, objective)
            if args.max_minutes and clock.seconds() >= args.max_minutes * 60:
                stop.requested = True  # like a signal: every rank stops at this step, after a checkpoint
            stopping = stop.agreed(device, world_size)
            if rank == 0 and due(step, args.sample_every, last or stopping):
                write_progress_grid(objective.ema, objective.noise_prior, args, source, step, device)
            if objective.after_step(step, last, log, clock):  # a new best in-loop FID
                state = run_state()
                if rank == 0:
                    checkpoint.save(state, os.path.join(args.out_dir, "best.pt"))
            if judge is not None and due(step, args.judge_every, last or stopping):
                judge_samples(judge, objective, args, step, clock, log)  # a judgement changes no state
            # never over the last good checkpoint while steps are being skipped
            if due(step, args.ckpt_every, last or stopping) and bad_steps == 0:
                state = run_state()
                saved = rank == 0 and checkpoint.save_training_state(state, objective.modules, args.out_dir,
                                                                     args.keep)
                last_saved_step = step if saved else last_saved_step
            log.progress.update(1)
            if stopping:
                break
    finally:
        log.close()
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return objective


def start(args, Objective, rank, world_size, device, resume_state):
    """The data, and the objective's networks where they start (a checkpoint, a previous phase, or scratch),
    with the random streams where they were -> (source, the objective)."""
    checkpoint.claim_out_dir(args.out_dir, checkpoint.RUN_FILES, args.resume, args.overwrite, rank,
                             world_size)
    np.random.seed(args.seed)
    random.seed(args.seed)
    source = vae.open_data(args, rank, world_size, device, flip=args.flip, decoder=True)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    objective = Objective(args, source, device, rank, world_size, resume_state)
    torch.manual_seed(args.seed * 1000 + rank + 1)  # then each rank draws its own noise
    if resume_state is not None:
        checkpoint.restore_position(resume_state, source.loader, rank, world_size)
    return source, objective


def announce(args, objective, source, world_size, device, step, sources):
    """What runs: a line on the console, where its values came from (config.py's rows, or on --resume the
    checkpoint), and the full configuration in the console and in config.json."""
    n_params = sum(p.numel() for p in objective.G.parameters()) / 1e6
    print(f"{objective.name}: G {args.model} ({n_params:.1f}M params), {source.size} training samples, "
          f"{world_size} x {device}, global batch {args.batch_size}, starting at step {step}")
    print("values from " + (config.describe_sources(sources) or "the checkpoint"))
    print("config: " + json.dumps(vars(args)))
    checkpoint.write_config(args.out_dir, vars(args))


def due(step, every, last):
    return step % every == 0 or last


def log_metrics(log, step, minutes, objective):
    """One log.jsonl line: the metrics averaged since the last one, the schedules, and the speed."""
    averages, img_per_s = log.averages(step)
    record = dict(step=step, minutes=minutes, **averages, **objective.log_fields(), img_per_s=img_per_s)
    log(record)
    log.progress.set_postfix(**{short: f"{record[name]:.4g}" for short, name in objective.progress.items()},
                             img_s=f"{img_per_s:.0f}")


def judge_samples(judge, objective, args, step, clock, log):
    """A log line for each of the objective's judged step counts, with the training clock paused."""
    minutes = clock.seconds() / 60
    with clock.paused():
        for nfe in objective.judge_nfe:
            result = judge(objective.ema, nfe=nfe, pred=args.pred, prior=objective.noise_prior)
            log(dict(step=step, minutes=minutes, nfe=nfe, **{f"judge_{k}": v for k, v in result.items()}),
                f"nfe {nfe}: " + quality.describe(result, judge.real_accuracy))


def main(argv=None, Objective=AFM):
    argv = sys.argv[1:] if argv is None else list(argv)
    if Objective is AFM and "--train-classifier" in argv:
        classifier.main([a for a in argv if a != "--train-classifier"])
        return
    args = Objective.parse_args(argv)
    errors = {Diverged: 3, (data.DataError, checkpoint.CheckpointError, vae.VAEError, fid.FidError): 2}
    body = checkpoint.reporting_write_errors(os.path.join(args.out_dir, "ckpt.pt"))(
        lambda: train(args, Objective))
    code = run(body, args.debug, errors, quiet=config.said_by_rank_0)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
