"""Train the time-conditioned classifier that flow-based classifier guidance needs, and load it back.

    python classifier.py --data folder --data-path DIR --image-size 32                 # a laptop run
    torchrun --nproc_per_node=8 classifier.py --data imagenet --data-path latents.npy  # the paper's recipe

(`python train.py --train-classifier ...` is an alias: it passes the other flags on to this file.)

Flow-based classifier guidance (paper sec. 3.5, eq. 26; App. F) asks a classifier C(x_t', t') how recognisable
G's output still is after re-noising it to a random time t' with fresh noise. So C must work at every noise
level: it is trained with cross-entropy on x_t = (1 - t) x + t z with t ~ U(0, 1) per sample, and sees t
through its time embedding (model.Classifier). The recipe (paper sec. 4, the authors' classifier config):

    network     model.Classifier, a DiT with a learned [CLS] token, conditioned on time only; B/2 in the paper
    data        the same sources as train.py; ImageNet as SD-VAE latents. Affine augmentation of x before
                noising: p 0.8, +-10 degrees, translate 0.3, scale 1.0-1.3, reflection padding
                (augment.AffineAugment)
    optimizer   AdamW, lr --lr (1e-4 in the paper), betas (0.9, 0.95), weight decay 0; gradients clipped at
                --grad-clip (50: in practice a NaN guard and a log)
    EMA         decay 0.9995, warmed up as min(0.9995, (1 + step) / (10 + step)) so that a short run's EMA is
                not mostly the random initialization; after a few thousand steps it is the plain 0.9995 EMA
    length      30 epochs: --max-steps 150000 at batch 256 on ImageNet (the imagenet preset)

Guidance feeds the classifier G's outputs, so train it on the same --data, --data-path and --image-size as
the GAN.

Output in --out-dir: classifier.pt (the EMA weights under "classifier", which guidance uses, plus everything
needed to --resume exactly) and classifier_log.jsonl. Each log line has the online network's training loss and
accuracy (augmented x, random t, averaged since the last line), and acc_t0 ... acc_t1: the EMA network's
accuracy on the current un-augmented batch noised to one fixed t for the whole batch. These should fall from
near the clean accuracy at t = 0 to chance at t = 1, where the input is pure noise.

This file is its own entry point and imports nothing from train.py; the process setup and the data sources it
shares with train.py come from runtime.py and vae.open_data.
"""

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import data
import losses
import runtime
import vae
from augment import AffineAugment
from model import MODELS, Classifier

BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.0
EMA_DECAY = 0.9995
NOISE_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)

# Flags left unset take the preset of --data: the paper's classifier on ImageNet latents (sec. 4: B/2,
# 30 epochs at batch 256), and a tiny one for the small sources that sit in memory (cifar10, mnist, ...)
# or in a folder.
SMALL = dict(model="T/4", image_size=32, batch_size=32, lr=2e-4, max_steps=20_000, ckpt_every=1000,
             log_every=50, num_workers=0)
PRESETS = {"folder": dict(SMALL, num_workers=4),
           "imagenet": dict(model="B/2", image_size=256, batch_size=256, lr=1e-4, max_steps=150_000,
                            ckpt_every=5000, log_every=100, num_workers=8)}

# What the weights, the data position or the random streams depend on: a resumed run cannot change these.
FIXED_ON_RESUME = ("data", "image_size", "model", "batch_size", "seed")
# What a run writes in --out-dir (train.py's runs may share the folder: their files are other names).
RUN_FILES = ("classifier.pt", "classifier_log.jsonl")


def make_parser():
    p = argparse.ArgumentParser(description="Train the time-conditioned classifier for flow-based classifier "
                                            "guidance. Unset flags take the --data preset.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="cifar10",
                   help="the data source, as train.py's --data (cifar10, folder, imagenet, ...)")
    p.add_argument("--data-path", default=None, help="dataset location, as for train.py")
    p.add_argument("--image-size", type=int, default=None, help="pixels: the GAN's (32; imagenet: 256)")
    p.add_argument("--vae", default=None,
                   help="sd-vae-ft-mse weights, to encode an ImageNet image folder on the fly")
    p.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)} (T/4; imagenet: B/2)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch, split over the processes")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    p.add_argument("--grad-clip", type=float, default=50.0, help="max gradient norm")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out-dir/classifier.pt; flags given now take effect, except "
                   + ", ".join("--" + f.replace("_", "-") for f in FIXED_ON_RESUME))
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out-dir that holds a "
                   "classifier.pt: delete it and its log first (without it, such a run is refused)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32",
                   help="CUDA matmul precision; bf16 is autocast and opt-in. CPU always runs fp32")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading worker processes per rank")
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss or gradient")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_args(argv=None):
    """-> (args, the names of the flags typed on the command line)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    for name, value in PRESETS.get(args.data, SMALL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args, checkpoint.flags_given(parser, argv)


def ema_decay_at(step):
    return min(EMA_DECAY, (1 + step) / (10 + step))


@torch.no_grad()
def accuracy_by_noise_level(net, x, y, seed=0):
    """{"acc_t0": ..., "acc_t0.25": ..., ...}: accuracy (0-d tensors) with the whole batch at each fixed t.
    The noise comes from its own generator, the same at every level, so measuring never changes the training
    random stream."""
    noise = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(seed), device=x.device)
    accuracies = {}
    for level in NOISE_LEVELS:
        t = torch.full((x.shape[0],), level, device=x.device)
        logits = net(losses.interpolate(x, noise, t), t)
        accuracies[f"acc_t{level:g}"] = (logits.argmax(1) == y).float().mean()
    return accuracies


def check_contents(state, path):
    """A classifier checkpoint, or CheckpointError naming what the file is instead."""
    if isinstance(state, dict) and "classifier" in state and "classifier_kwargs" in state:
        return
    if isinstance(state, dict) and "G" in state and "generator_kwargs" in state:
        raise checkpoint.CheckpointError(f"{path} is a GAN checkpoint (train.py's ckpt.pt), not a "
                                         f"classifier; pass the classifier.pt written by "
                                         f"`python classifier.py`")
    raise checkpoint.CheckpointError(f"{path} is not a classifier checkpoint (no 'classifier' weights and "
                                     f"'classifier_kwargs'); pass a classifier.pt from "
                                     f"`python classifier.py`")


def load_classifier(path, device="cpu"):
    """classifier.pt -> model.Classifier with the EMA weights, in eval mode, without gradients, on device."""
    state = checkpoint.load(path)
    check_contents(state, path)
    try:
        net = Classifier(**state["classifier_kwargs"])
    except (TypeError, ValueError, KeyError) as e:
        raise checkpoint.CheckpointError(f"{path} has unusable classifier_kwargs ({e})") from None
    checkpoint.load_weights(net, state["classifier"], what=f"classifier {path}")
    return net.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """One training process: its flags and place, and the state that a step updates and a checkpoint saves."""

    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    autocast: Callable  # -> the context that runs the forward pass at --precision
    ckpt_path: str
    source: vae.TrainingData  # next_batch, the loader (whose position is saved) and the data's shapes
    classifier_kwargs: dict
    net: Classifier  # the online network, which the optimizer updates
    ema: Classifier  # its EMA, which guidance uses: saved under "classifier"
    params: list  # net's trainable parameters
    opt: torch.optim.Optimizer
    net_train: torch.nn.Module  # net, wrapped in DDP when there are several processes
    step: int = 0
    bad_steps: int = 0  # consecutive non-finite steps


def resolve_flags(args, given, world_size, ckpt_path):
    """-> (the flags to run with, the checkpoint state to resume from or None). --resume takes the
    checkpoint's flags except those in given, the flags typed now."""
    resume_state = checkpoint.load(ckpt_path) if args.resume else None
    if resume_state is not None:
        check_contents(resume_state, ckpt_path)
        args = argparse.Namespace(**checkpoint.resumed_config(
            resume_state["config"], vars(args), set(given), FIXED_ON_RESUME))
    if args.model not in MODELS:
        raise data.DataError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
    if args.batch_size <= 0 or args.batch_size % world_size:
        raise data.DataError(f"--batch-size {args.batch_size} must be positive and divisible by the number "
                             f"of processes ({world_size})")
    return args, resume_state


def start_run(args, given):
    """Set up the process, the data and the networks; with --resume, continue where the checkpoint stopped."""
    rank, world_size, device = runtime.setup_distributed(args.device)
    ckpt_path = os.path.join(args.out_dir, "classifier.pt")
    args, resume_state = resolve_flags(args, given, world_size, ckpt_path)
    checkpoint.claim_out_dir(args.out_dir, RUN_FILES, args.resume, args.overwrite, rank, world_size)
    autocast = runtime.set_precision(args.precision, device)
    source = vae.open_data(args, rank, world_size, device)
    classifier_kwargs = dict(MODELS[args.model], input_size=source.input_size, in_channels=source.in_channels,
                             num_classes=source.num_classes)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    net = Classifier(**classifier_kwargs).to(device)
    ema = Classifier(**classifier_kwargs).to(device).requires_grad_(False).eval()
    ema.load_state_dict(net.state_dict())
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=BETAS, weight_decay=WEIGHT_DECAY,
                            fused=device.type == "cuda")
    net_train = net
    if world_size > 1:
        net_train = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(args, rank, world_size, device, autocast, ckpt_path, source, classifier_kwargs, net, ema,
              params, opt, net_train)
    torch.manual_seed(args.seed * 1000 + rank + 1)  # then each rank draws its own augmentations, times, noise
    if resume_state is not None:
        restore(run, resume_state)
    return run


def restore(run, state):
    """Continue from a checkpoint's state: the weights, the optimizer (at the --lr given now), the data
    position, the step and, when the number of processes is unchanged, each rank's random streams."""
    checkpoint.load_weights(run.net, state["online"], what=f"{run.ckpt_path} online")
    checkpoint.load_weights(run.ema, state["classifier"], what=f"{run.ckpt_path} classifier")
    run.opt.load_state_dict(state["opt"])
    for group in run.opt.param_groups:  # the state_dict carries the old learning rate; --lr may change it
        group["lr"] = run.args.lr
    run.source.loader.load_state_dict(state["data"])
    run.step = state["step"]
    if len(state["rng"]) == run.world_size:
        checkpoint.set_rng_state(state["rng"][run.rank])
    else:
        print("warning: resuming with a different number of processes; random streams restart",
              file=sys.stderr)


def save(run):
    """Write classifier.pt (all ranks take part: each one's random streams are gathered)."""
    rng_states = checkpoint.gather_rng_states(run.world_size)
    if run.rank == 0:
        checkpoint.save({"classifier_kwargs": run.classifier_kwargs, "classifier": run.ema.state_dict(),
                         "online": run.net.state_dict(), "opt": run.opt.state_dict(), "step": run.step,
                         "config": vars(run.args), "rng": rng_states, "data": run.source.loader.state_dict()},
                        run.ckpt_path)


def train_step(run, x, y, augment):
    """One step on the batch (x, y), each sample at its own random time -> its loss, accuracy and gradient
    norm (0-d tensors). A non-finite step is skipped, never applied; --max-bad-steps in a row raise
    runtime.Diverged."""
    t = torch.rand(x.shape[0], device=run.device)  # (N,)
    x_t = losses.interpolate(augment(x), torch.randn_like(x), t)
    with run.autocast():
        logits = run.net_train(x_t, t).float()  # (N, num_classes)
    loss = F.cross_entropy(logits, y)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.args.grad_clip)
    if bool(torch.isfinite(loss + grad_norm)):
        run.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(run.ema.parameters()), list(run.net.parameters()),
                                 1 - ema_decay_at(run.step))
        run.bad_steps = 0
    else:
        run.bad_steps += 1
        if run.bad_steps >= run.args.max_bad_steps:
            raise runtime.Diverged(f"the loss became non-finite: {run.bad_steps} consecutive steps up to "
                                   f"step {run.step + 1} were skipped; lower --lr or resume from "
                                   f"{run.ckpt_path}")
    run.step += 1
    return dict(loss=loss.detach(), acc=(logits.argmax(1) == y).float().mean(), grad_norm=grad_norm.detach())


def log_values(run, x, y, log):
    """The next log line's numbers, averaged over the processes: the online network's loss, accuracy and
    gradient norm averaged over the steps since the last line, and the EMA network's accuracy at each noise
    level on the un-augmented batch (x, y). -> (values, images per second)."""
    averages, img_per_s = log.averages(run.step)
    with run.autocast():
        by_level = accuracy_by_noise_level(run.ema, x, y, seed=run.step * 1000 + run.rank)
    # (3 + len(NOISE_LEVELS),)
    values = torch.cat([torch.tensor(list(averages.values()), device=run.device),
                        torch.stack(list(by_level.values())).float()])
    if run.world_size > 1:
        dist.all_reduce(values)
        values /= run.world_size
    return dict(zip([*averages, *by_level], values.tolist())), img_per_s


def train_classifier(args, given=()):
    """Train, or continue (--resume) with the checkpoint's flags except those in given, the flags typed now.
    -> the EMA network."""
    run = start_run(args, given)
    args, main_process = run.args, run.rank == 0
    if main_process:
        print(f"classifier {args.model} ({sum(p.numel() for p in run.params) / 1e6:.1f}M params), "
              f"{run.source.num_classes} classes, {run.world_size} x {run.device}, "
              f"global batch {args.batch_size}, starting at step {run.step}")
    augment = AffineAugment()
    log = runtime.TrainingLog(os.path.join(args.out_dir, "classifier_log.jsonl"), args.max_steps, run.step,
                              args.batch_size, main_process)
    stop = checkpoint.StopFlag()
    try:  # an error ends the progress bar first, so that its line starts on a clean line
        while run.step < args.max_steps:
            x, y = run.source.next_batch()
            log.add(train_step(run, x, y, augment))
            if run.step % args.log_every == 0 or run.step == args.max_steps:
                values, img_per_s = log_values(run, x, y, log)
                log(dict(step=run.step, **values, lr=run.opt.param_groups[0]["lr"], img_per_s=img_per_s))
                log.progress.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['acc']:.2f}",
                                         acc_t0=f"{values['acc_t0']:.2f}", acc_t1=f"{values['acc_t1']:.2f}")
            stopping = stop.agreed(run.device, run.world_size)
            if run.step % args.ckpt_every == 0 or run.step == args.max_steps or stopping:
                save(run)
            log.progress.update(1)
            if stopping:
                break
    finally:
        log.close()
    if run.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run.ema


def main(argv=None):
    args, given = parse_args(argv)
    body = checkpoint.reporting_write_errors(os.path.join(args.out_dir, "classifier.pt"))(
        lambda: train_classifier(args, given))
    code = runtime.run(body, args.debug,
                       {runtime.Diverged: 3, (data.DataError, checkpoint.CheckpointError, vae.VAEError): 2})
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
