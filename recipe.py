"""The paper's recipe around the plain training loop, and evaluation during training.

    phases      --phase 1..4 applies a row of Table 11 (TABLE_11 below); --init-from continues the previous
                phase's run
    guidance    flow-based classifier guidance in the G update (eqs. 26 and 38), with a classifier.py network
    augment     discriminator augmentation (augment.py): phase 4; a -2..2 pixel shift in the laptop presets
    reloads     --ema-reload-every copies the EMA into G; --d-reload-on-stall resets D to its best-FID weights
    evaluation  in-loop FID of the EMA, best.pt at each new best; the sample judge (quality.py) on small data

train.py calls this file when parsing (add_arguments, phase_preset, defaults), before the run (validate), once
the networks exist (start, make_guidance, make_augment, Recipe) and after each step (Recipe.after_step).
Without its flags every piece is off and train.py runs the plain algorithm.
"""

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import classifier
import data
import fid
import losses
import quality
from augment import PairedAugment
from sample import sample_images

# ------------------------------------------------------------------------------------------------------------
# Table 11: the schedule the authors ran by hand, one row per phase. A pair is (1-NFE, multi-step). Deep 1-NFE
# generators (--repeat R) use the D learning rate lr_deep[R] where the table gives one, and G's = D's / R.

TABLE_11 = {
    1: dict(lr=(1e-4, 1e-4), lr_deep={}, ot=((0.2, 0.25), 0.005),
            ema_reload_every=None, d_reload_on_stall=None, cg_scale=None, augment_p=None),
    2: dict(lr=(8e-5, 8e-5), lr_deep={}, ot=(0.001, 0.001),
            ema_reload_every=5000, d_reload_on_stall=None, cg_scale=None, augment_p=None),
    3: dict(lr=(3e-5, 3e-5), lr_deep={2: 3e-5, 4: 1e-5}, ot=(0.001, 0.001),
            ema_reload_every=5000, d_reload_on_stall=3, cg_scale=None, augment_p=None),
    4: dict(lr=(5e-5, 3e-5), lr_deep={2: 2e-5, 4: 2e-5}, ot=(0.001, 0.001),
            ema_reload_every=5000, d_reload_on_stall=3, cg_scale=(0.003, 0.02), augment_p=0.4),
}
# lr: AdamW learning rate of D (and of G, divided by --repeat); ot: lambda_ot (start, end) of the cosine;
# ema_reload_every: at every 10k-iteration evaluation (5000 of our D+G steps); d_reload_on_stall: evaluations
# without a better FID; cg_scale: lambda_cg of flow-based guidance; augment_p: discriminator augmentation.
# None: the row leaves the flag alone.
PHASE_1_OT_END = {"B/2": 0.01}  # B/2 ends its lambda_ot decay at 0.01 instead of 0.005
PHASE_4_CG_T = "0,0.1"          # 1-NFE guidance draws t' ~ U(0, 0.1); multi-step guides at CG_TARGET_TIMES

# Multi-step guidance applies the cross-entropy at t' = t on these target times only (Table 11, eq. 38). The
# paper gives them for 2 and 4 NFE; other K need --cg-target-times. Any-step models guide every sample at
# its own t.
CG_TARGET_TIMES = {2: "0", 4: "0,0.25"}


def phase_preset(phase, nfe, repeat, model):
    """Table 11's row for this phase, model, NFE and depth, as flag values."""
    row = TABLE_11[phase]
    multi_step = nfe != 1

    def pick(value):  # a (1-NFE, multi-step) pair, or one value for both
        return value[multi_step] if isinstance(value, tuple) else value

    preset = dict(prior="standard", lr=row["lr_deep"].get(repeat, pick(row["lr"])),  # the paper's N(0, I)
                  ot_start=pick(row["ot"][0]),
                  ot_end=PHASE_1_OT_END.get(model, row["ot"][1]) if phase == 1 else row["ot"][1])
    for name in ("ema_reload_every", "d_reload_on_stall", "cg_scale", "augment_p"):
        if row[name] is not None:
            preset[name] = pick(row[name])
    if row["cg_scale"] is not None and not multi_step:
        preset["cg_t"] = PHASE_4_CG_T
    return preset


def defaults(nfe):
    """The recipe's flags when neither they nor a phase set them: everything off."""
    return dict(cg_scale=0.0, cg_t=PHASE_4_CG_T, cg_target_times=CG_TARGET_TIMES.get(nfe), augment_p=0.0,
                ema_reload_every=0, d_reload_on_stall=0, judge_every=0)


def add_arguments(parser):
    p = parser.add_argument_group("the paper's recipe (Table 11) and evaluation during training (recipe.py)")
    add = p.add_argument
    add("--phase", type=int, choices=[1, 2, 3, 4], help="apply that row of the paper's Table 11 for "
        "--model/--nfe/--repeat; explicit flags win")
    add("--init-from", help="start from another run's ckpt.pt: G, EMA, D and gradnorm state are kept, "
        "optimizers and hyperparameters are new (the previous phase's checkpoint)")
    add("--classifier", help="classifier.pt for flow-based classifier guidance")
    add("--cg-scale", type=float, help="lambda_cg (default 0: no guidance; phase 4: 0.003 for 1-NFE, 0.02 "
        "multi-step)")
    add("--cg-t", help=f"1-NFE guidance: t' ~ U(lo, hi), as 'lo,hi' (eq. 26; default {PHASE_4_CG_T})")
    add("--cg-target-times", help="multi-step guidance: CE at t' = the target time, on these target times, "
        "e.g. '0,0.25' (default: Table 11's, for 2 and 4 NFE)")
    add("--augment-p", type=float, help="discriminator augmentation probability (default: 1 for the laptop "
        "--data rows, 0 for imagenet; phase 4: 0.4)")
    add("--augment-translate", type=float, help="the augmentation's shift, as a fraction of the size: t "
        "draws whole-pixel shifts in [-t, t] (default: 0.08 for the laptop --data rows; otherwise the "
        "authors' one-sided range, 0 to 0.3)")
    add("--augment-cutouts", type=int, help="rectangles zeroed per augmented pair (default: 0 for the laptop "
        "--data rows; otherwise 3, the authors')")
    add("--ema-reload-every", type=int, help="copy the EMA into G every N steps (default 0: off; phases 2-4: "
        "5000)")
    add("--d-reload", help="start D from this checkpoint's D")
    add("--d-reload-on-stall", type=int, help="reload D from the best-FID point after this many evaluations "
        "without improvement (default 0: off; phases 3-4: 3)")
    add("--fid-every", type=int, default=0, help="in-loop FID of the EMA every N steps (0: off)")
    add("--fid-samples", type=int, default=10_000, help="class-balanced samples per in-loop FID")
    add("--fid-ref", help="reference statistics .npz (mu, sigma) from `fid.py --stats`")
    add("--fid-weights", help="FID Inception weights (default: downloaded once)")
    add("--judge-every", type=int, help="every N steps, label class-balanced EMA samples with a small "
        "classifier trained on the real images: class accuracy, Frechet distance, precision and recall in "
        "its features (quality.py; cifar10, mnist, fashion-mnist and small folders; 0: off; default: the "
        "--data row's)")
    add("--judge", help="judge file for --judge-every (default: OUT_DIR/judge.pt, trained there on first "
        "use, about a minute on a CPU)")
    add("--judge-samples", type=int, default=1000, help="samples per judgement")


# ------------------------------------------------------------------------------------------------------------
# Checking the flags


class ArgumentError(data.DataError):
    """Bad flags: every rank raises the same one, rank 0 alone prints it."""


def validate(args):
    if args.cg_scale > 0 and not args.classifier:
        raise ArgumentError("classifier guidance (--cg-scale > 0, or --phase 4) needs --classifier PATH; "
                            "train one with `python classifier.py`")
    if args.cg_scale > 0 and args.nfe == "any" and args.cg_target_times is not None:
        raise ArgumentError("--cg-target-times picks among a K-step model's target times; --nfe any draws t "
                            "continuously and guides every sample at t' = t (eq. 38): drop --cg-target-times")
    if args.cg_scale > 0 and args.nfe not in (1, "any"):
        check_target_times(args.cg_target_times, args.nfe)
    if args.judge_every and args.data == "imagenet":
        raise ArgumentError("--judge-every judges small pixel datasets (cifar10, mnist, fashion-mnist, "
                            "folder); on ImageNet use the in-loop FID (--fid-every)")
    if args.d_reload_on_stall and not (args.fid_every and args.fid_ref):
        raise ArgumentError("--d-reload-on-stall (phases 3 and 4) watches the in-loop FID: pass --fid-every "
                            "N and --fid-ref STATS.npz, or --d-reload-on-stall 0")


def check_target_times(text, nfe):
    """--cg-target-times for a K-step generator: a comma-separated subset of its target times 0, 1/K, ...,
    1 - 1/K (any other time never occurs in training, so guidance there would silently do nothing)."""
    targets = [k / nfe for k in range(nfe)]
    listed = ", ".join(f"{t:g}" for t in targets)
    if text is None:
        raise ArgumentError(f"multi-step guidance needs --cg-target-times for --nfe {nfe} (the paper gives "
                            f"them for 2 and 4 NFE only): a comma-separated subset of {listed}")
    try:
        times = [float(v) for v in text.split(",")]
    except ValueError:
        raise ArgumentError(f"--cg-target-times must be comma-separated numbers, got {text!r}") from None
    for chosen in times:
        if min(abs(chosen - t) for t in targets) > 1e-6:
            raise ArgumentError(f"--cg-target-times {chosen:g} is not a target time of a {nfe}-step "
                                f"generator ({listed})")


# ------------------------------------------------------------------------------------------------------------
# What the G and D updates receive


def make_guidance(args, device):
    """The flow-based classifier-guidance term for the G step, or None. The classifier is frozen, in eval
    mode, and runs inside the same autocast as D. 1-NFE: t' ~ U(lo, hi) with fresh noise (eq. 26). Multi-step:
    the cross-entropy at t' = the target time t of each sample, on the chosen target times only (eq. 38;
    Table 11); any-step: the same on every sample, since its target times are continuous."""
    if args.cg_scale <= 0:
        return None
    guide = classifier.load_classifier(args.classifier, device)
    if args.nfe == 1:
        t_lo, t_hi = (float(v) for v in args.cg_t.split(","))
        return lambda fake, y, t: args.cg_scale * losses.classifier_guidance_loss(guide, fake, y, t_lo, t_hi)
    if args.nfe == "any":  # t ~ U(0, s) is continuous: every sample is guided at its own target time
        return lambda fake, y, t: args.cg_scale * F.cross_entropy(guide(fake, t), y)
    target_times = torch.tensor([float(v) for v in args.cg_target_times.split(",")], device=device)

    def multistep_guidance(fake, y, t):
        selected = (t[:, None] - target_times[None]).abs().min(dim=1).values < 1e-6  # (N,) bool
        ce = F.cross_entropy(guide(fake, t), y, reduction="none")
        return args.cg_scale * (ce * selected).mean()

    return multistep_guidance


def make_augment(args):
    """PairedAugment with --augment-p, and --augment-translate / --augment-cutouts where set (otherwise the
    authors' values, PairedAugment's defaults); None at p = 0."""
    if args.augment_p == 0:
        return None
    given = dict(translate=args.augment_translate, cutouts=args.augment_cutouts)
    return PairedAugment(p=args.augment_p, **{k: v for k, v in given.items() if v is not None})


def start(nets, args):
    """A new run's starting weights: --init-from (the previous phase), then --d-reload for D."""
    if args.init_from:
        checkpoint.load_networks(nets, checkpoint.load(args.init_from), args.init_from)
    if args.d_reload:
        state = checkpoint.load(args.d_reload)
        checkpoint.load_weights(nets.D, state.get("D", state), what=f"--d-reload {args.d_reload}")


# ------------------------------------------------------------------------------------------------------------
# After each step: reloads and evaluation


@torch.no_grad()
def in_loop_fid(ema, prior, args, inception, reference, decode, device, rank, world_size):
    """FID of --fid-samples class-balanced EMA samples against --fid-ref. Sample i always gets the noise of
    (seed, i), through the run's prior, so successive evaluations compare like with like; the ranks split the
    samples and sum their
    feature statistics. A rough in-training estimate: report final numbers from 50k samples (README)."""
    stats = fid.FeatureStatistics(device=device)
    indices = np.arange(rank, args.fid_samples, world_size)
    nfe = 8 if args.nfe == "any" else args.nfe
    for start_index in range(0, len(indices), args.batch_size // world_size):
        batch = indices[start_index:start_index + args.batch_size // world_size]
        labels = torch.from_numpy(batch % ema.num_classes)
        images = sample_images(ema, decode, batch, labels, args.seed, nfe, args.pred, device, prior)  # uint8
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


class Recipe:
    """The reloads and evaluations that run after a step, and the state of them that ckpt.pt keeps.

    log(record, message) writes a log line; run_state() is the ckpt.pt state now (best.pt is a copy of it);
    the clock is paused while judging and computing FID, so that --max-minutes counts training alone."""

    def __init__(self, args, nets, shape, decode, device, rank, world_size, resume_state, log, run_state,
                 clock):
        self.args = args
        self.nets = nets
        self.decode = decode
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.log = log
        self.run_state = run_state
        self.clock = clock
        state = resume_state or {}
        self.best_fid, self.evals_since_best = state.get("fid_tracking", (None, 0))
        self.best_d = state.get("best_D")
        self.judge = None
        if args.judge_every and rank == 0:
            path = args.judge or os.path.join(args.out_dir, "judge.pt")
            judge_net = quality.judge_or_train(path, args.data, args.data_path, shape[-1])
            self.judge = quality.SampleJudge(*judge_net, shape, args.judge_samples, args.seed)
        if args.fid_every:
            self.inception = fid.load_inception(args.fid_weights, device=device)
            self.reference = np.load(args.fid_ref)
            if "mu" not in self.reference or "sigma" not in self.reference:
                raise data.DataError(f"--fid-ref {args.fid_ref} has no mu/sigma: write it with "
                                     f"`python fid.py --stats`")

    def state(self):
        """What ckpt.pt keeps of the recipe."""
        state = {"fid_tracking": [self.best_fid, self.evals_since_best]}
        if self.best_d is not None:
            state["best_D"] = self.best_d
        return state

    def at_start(self, step):
        if self.judge is not None and step == 0:
            self.judge_samples(step)

    def after_step(self, step, last, stopping=False):
        """stopping: the run ends after this step (a signal or --max-minutes). The judge, which changes no
        state, then labels the samples G ends with; FID keeps its schedule, as it can reload D."""
        args = self.args
        if args.ema_reload_every and step % args.ema_reload_every == 0:
            self.nets.G.load_state_dict(self.nets.ema.state_dict())  # the average is the better equilibrium
            self.log(dict(step=step, event="EMA reloaded into G"))
        if self.judge is not None and (step % args.judge_every == 0 or last or stopping):
            self.judge_samples(step)
        if args.fid_every and (step % args.fid_every == 0 or last):
            with self.clock.paused():
                value = in_loop_fid(self.nets.ema, self.nets.noise_prior, args, self.inception,
                                    self.reference, self.decode, self.device, self.rank, self.world_size)
            self.log(dict(step=step, fid=value, fid_samples=args.fid_samples))
            self.track_best(step, value)

    def judge_samples(self, step):
        minutes = self.clock.seconds() / 60
        with self.clock.paused():
            nfe = 8 if self.args.nfe == "any" else self.args.nfe
            result = self.judge(self.nets.ema, nfe=nfe, pred=self.args.pred, prior=self.nets.noise_prior)
        diversity = f", precision {result['precision']:.2f}, recall {result['recall']:.2f}" \
            if "recall" in result else ""
        self.log(dict(step=step, minutes=minutes, **{f"judge_{k}": v for k, v in result.items()}),
                 f"samples labelled as their class {result['accuracy']:.3f} "
                 f"({result['accuracy_ratio']:.2f} of real), Frechet distance {result['fd']:.1f} "
                 f"({result['fd_ratio']:.3f} of the untrained generator's){diversity}")

    def track_best(self, step, value):
        """best.pt at each new best FID; D back to its best-FID weights after --d-reload-on-stall evaluations
        without improvement."""
        if self.best_fid is None or value < self.best_fid:
            self.best_fid = value
            self.evals_since_best = 0
            if self.args.d_reload_on_stall:
                self.best_d = {k: v.detach().cpu().clone() for k, v in self.nets.D.state_dict().items()}
            state = self.run_state()
            if self.rank == 0:
                checkpoint.save(state, os.path.join(self.args.out_dir, "best.pt"))
            return
        self.evals_since_best += 1
        if self.args.d_reload_on_stall and self.evals_since_best >= self.args.d_reload_on_stall:
            self.nets.D.load_state_dict(self.best_d)
            self.evals_since_best = 0
            self.log(dict(step=step, event=f"FID stalled for {self.args.d_reload_on_stall} evaluations: D "
                                           f"reloaded from the best-FID point (FID {self.best_fid:.3f})"))

