"""The paper's recipe around the plain training step, as train.py's AFM uses it.

    phases      --phase 1..4 applies a row of Table 11 (its values: config.py); --init-from continues the
                previous phase's run
    guidance    flow-based classifier guidance in the G update (eqs. 26 and 38), with a classifier.py network
    augment     discriminator augmentation (augment.py): phase 4; a -2..2 pixel shift in the laptop row
    reloads     --ema-reload-every copies the EMA into G; --d-reload-on-stall resets D to its best-FID weights
    FID         the in-loop FID of the EMA; train.py writes best.pt at each new best

Without its flags every piece is off and train.py runs the plain algorithm.
"""

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import classifier
import config
import data
import fid
import losses
from augment import PairedAugment
from config import ArgumentError
from sample import sample_images


# ------------------------------------------------------------------------------------------------------------
# The flags (their values: config.py)


def add_arguments(parser):
    p = parser.add_argument_group("the paper's recipe (Table 11) and the in-loop FID (recipe.py)")
    add = p.add_argument
    add("--phase", type=int, choices=[1, 2, 3, 4], help="apply that row of the paper's Table 11 for "
        "--model/--nfe/--repeat; explicit flags win")
    add("--init-from", help="start from another run's ckpt.pt: G, EMA, D and gradnorm state are kept, "
        "optimizers and hyperparameters are new (the previous phase's checkpoint)")
    add("--classifier", help="classifier.pt for flow-based classifier guidance")
    add("--cg-scale", type=float, help="lambda_cg (default 0: no guidance; phase 4: 0.003 for 1-NFE, 0.02 "
        "multi-step)")
    add("--cg-t", help=f"1-NFE guidance: t' ~ U(lo, hi), as 'lo,hi' (eq. 26; default {config.PHASE_4_CG_T})")
    add("--cg-target-times", help="multi-step guidance: CE at t' = the target time, on these target times, "
        "e.g. '0,0.25' (default: Table 11's, for 2 and 4 NFE)")
    add("--augment-p", type=float, help="discriminator augmentation probability (paper 0; laptop 1; phase 4: "
        "0.4)")
    add("--augment-translate", type=float, help="the augmentation's shift, as a fraction of the size: t "
        "draws whole-pixel shifts in [-t, t] (paper: the authors' one-sided range, 0 to "
        "0.3; laptop 0.08)")
    add("--augment-cutouts", type=int, help="rectangles zeroed per augmented pair (paper 3, the authors'; "
        "laptop 0)")
    add("--ema-reload-every", type=int, help="copy the EMA into G every N steps (default 0: off; phases 2-4: "
        "5000)")
    add("--d-reload", help="start D from this checkpoint's D")
    add("--d-reload-on-stall", type=int, help="reload D from the best-FID point after this many evaluations "
        "without improvement (default 0: off; phases 3-4: 3)")
    add("--fid-every", type=int, default=0, help="in-loop FID of the EMA every N steps (0: off)")
    add("--fid-samples", type=int, default=10_000, help="class-balanced samples per in-loop FID")
    add("--fid-ref", help="reference statistics .npz (mu, sigma) from `fid.py --stats`")
    add("--fid-weights", help="FID Inception weights (default: downloaded once)")


# ------------------------------------------------------------------------------------------------------------
# Checking the flags


def validate(args):
    if args.cg_scale > 0 and not args.classifier:
        raise ArgumentError("classifier guidance (--cg-scale > 0, or --phase 4) needs --classifier PATH; "
                            "train one with `python classifier.py`")
    if args.cg_scale > 0 and args.nfe == "any" and args.cg_target_times is not None:
        raise ArgumentError("--cg-target-times picks among a K-step model's target times; --nfe any draws t "
                            "continuously and guides every sample at t' = t (eq. 38): drop --cg-target-times")
    if args.cg_scale > 0 and args.nfe not in (1, "any"):
        check_target_times(args.cg_target_times, args.nfe)
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
def in_loop_fid(ema, prior, args, fid_record, decode, device, rank, world_size):
    """FID of --fid-samples class-balanced EMA samples against --fid-ref, with the Inception network and
    reference statistics of fid_record (a BestFid). Sample i always gets the noise of (seed, i), through the
    run's prior, so successive evaluations compare like with like; the ranks split the samples and sum their
    feature statistics. A rough in-training estimate: report final numbers from 50k samples (README)."""
    stats = fid.FeatureStatistics(device=device)
    indices = np.arange(rank, args.fid_samples, world_size)
    nfe = 8 if args.nfe == "any" else args.nfe
    for start_index in range(0, len(indices), args.batch_size // world_size):
        batch = indices[start_index:start_index + args.batch_size // world_size]
        labels = torch.from_numpy(batch % ema.num_classes)
        images = sample_images(ema, decode, batch, labels, args.seed, nfe, args.pred, device, prior)  # uint8
        stats.update(fid_record.inception(images.to(device).permute(0, 3, 1, 2)))
    if world_size > 1:
        count = torch.tensor(float(stats.count), dtype=torch.float64, device=stats.sum.device)
        for total in (stats.sum, stats.sum_outer, count):
            dist.all_reduce(total)
        stats.count = int(count.item())
    mu, sigma = stats.mean_and_covariance()
    reference = fid_record.reference
    value = torch.tensor(fid.frechet_distance(mu, sigma, reference["mu"], reference["sigma"]), device=device)
    if world_size > 1:
        dist.broadcast(value, src=0)  # every rank takes the same reload decisions
    return value.item()


class BestFid:
    """The in-loop FID's record, which ckpt.pt keeps: the best value so far, the evaluations since, and D's
    weights at the best (for --d-reload-on-stall); with --fid-every, the Inception network and reference."""

    def __init__(self, args, device, resume_state):
        self.args = args
        state = resume_state or {}
        self.best_fid, self.evals_since_best = state.get("fid_tracking", (None, 0))
        self.best_d = state.get("best_D")
        if args.fid_every:
            self.inception = fid.load_inception(args.fid_weights, device=device)
            self.reference = np.load(args.fid_ref)
            if "mu" not in self.reference or "sigma" not in self.reference:
                raise data.DataError(f"--fid-ref {args.fid_ref} has no mu/sigma: write it with "
                                     f"`python fid.py --stats`")

    def state(self):
        state = {"fid_tracking": [self.best_fid, self.evals_since_best]}
        if self.best_d is not None:
            state["best_D"] = self.best_d
        return state

    def track(self, step, value, D, log):
        """-> True at a new best FID. After --d-reload-on-stall evaluations without one, D goes back to its
        best-FID weights."""
        if self.best_fid is None or value < self.best_fid:
            self.best_fid, self.evals_since_best = value, 0
            if self.args.d_reload_on_stall:
                self.best_d = {k: v.detach().cpu().clone() for k, v in D.state_dict().items()}
            return True
        self.evals_since_best += 1
        if self.args.d_reload_on_stall and self.evals_since_best >= self.args.d_reload_on_stall:
            D.load_state_dict(self.best_d)
            self.evals_since_best = 0
            log(dict(step=step, event=f"FID stalled for {self.args.d_reload_on_stall} evaluations: D "
                                      f"reloaded from the best-FID point (FID {self.best_fid:.3f})"))
        return False
