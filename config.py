"""Every setting of a run, its value in the paper and on a laptop, and where a run takes it from.

A flag you type wins; any other takes the first value set by the --phase row (Table 11), the training row, or
the data row. The training row is the laptop row for the laptop models (T/*) on the laptop data sets, and the
paper's row (Table 10, and phase 1 of Table 11 for --nfe and --repeat) otherwise, so that a paper-size model
trains with the paper's values and needs --data imagenet.

Flags that no row sets (--seed, --out-dir, --device, ...) keep the defaults --help shows. flow_matching.py
brings its own two training rows and shares the data rows, the resolution and the flags of a run.
"""

import argparse
import os

import data
from model import MODELS

# ------------------------------------------------------------------------------------------------------------
# The data rows: what suits the images, whatever trains on them.

DATA = {  # T/7 cuts 28 px into 4 x 4 tokens of 7 x 7 pixels, T/8 32 px into 4 x 4 of 8 x 8 (1.2M parameters)
    "fashion-mnist": dict(model="T/7", image_size=28, flip=False, judge_every=250),
    "mnist": dict(model="T/7", image_size=28, flip=False, judge_every=250),
    "cifar10": dict(model="T/8", image_size=32, flip=True, judge_every=0),
    "folder": dict(model="T/8", image_size=32, flip=False, judge_every=0),
    "imagenet": dict(model="XL/2", image_size=256, flip=True, judge_every=0, num_workers=8),
}
# flip: mirrored digits and shoes are not in the data; a folder may hold digits or text (--flip for photos).
# judge_every: the MNISTs' judge trains in a minute; elsewhere --judge-every N trains one on the whole set.
# num_workers: unset, data.default_workers decides (none in memory, one for a folder of large images).
LAPTOP_DATA = ("fashion-mnist", "mnist", "cifar10", "folder")


# ------------------------------------------------------------------------------------------------------------
# The training rows of train.py. The paper's (Table 10; phase 1 of Table 11), for a K-step or deep generator:


def paper_row(nfe, repeat):
    multi_step = nfe != 1
    return dict(
        batch_size=256, lr=1e-4, g_lr=None,  # None: G's rate is --lr / --repeat
        weight_decay=0.01, ema_decay=0.9999, ema_warmup=0, prior="standard",
        pred="v" if multi_step else "x",     # multi-step generators predict velocities
        ot_start=0.25 if multi_step else 0.2, ot_end=0.005, ot_decay_steps=500_000,  # 100 epochs of D+G
        gp_scale=0.25, gp_eps=0.01, gp_ratio=0.25, cp_scale=0.01,
        grad_clip=5.0 if multi_step or repeat > 1 else 50.0,  # the authors' configs
        augment_p=0.0, augment_translate=None, augment_cutouts=None,  # None: the authors' (augment.py)
        cg_scale=0.0, cg_t=PHASE_4_CG_T, cg_target_times=CG_TARGET_TIMES.get(nfe),
        ema_reload_every=0, d_reload_on_stall=0,
        max_steps=1_000_000, ckpt_every=5000, sample_every=5000, log_every=100)


# The laptop row: the paper's, but for these, each measured on the real Fashion-MNIST on a 2-core CPU
# (docs/laptop.md, "The preset"). A laptop runs thousands of steps, the paper 500,000.
LAPTOP = dict(
    batch_size=32,            # 200-260 steps a minute on one core; batch 128 learnt more slowly
    lr=2e-3,                  # class conditioning grows about as lr^2; 5e-4 and 1e-3 slower, 3e-3 no faster
    g_lr=1e-3,                # G at half of D's rate: the samples of a class differ more in shape
    ema_decay=0.99, ema_warmup=10,  # decay min(0.99, (1 + step) / (10 + step)): no trace of the random start
    prior="data",             # noise fitted to the images (prior.py): one step draws many garments, not one
    ot_start=0.1, ot_end=0.1, ot_decay_steps=500,  # a pull towards z that lasts: decayed, recall fell back
    gp_scale=0.05,            # 0.81 of A_real after 8 minutes, against 0.72 with the paper's 0.25
    augment_p=1.0, augment_translate=0.08, augment_cutouts=0,  # pairs shifted -2..2 px: D sees G's seams
    max_steps=20_000, ckpt_every=1000, sample_every=500, log_every=50)


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


def phase_row(phase, nfe, repeat, model):
    """Table 11's row for this phase, model, NFE and depth, as flag values. The phases run on the paper's
    N(0, I) noise, and G's rate follows D's (g_lr None: --lr / --repeat)."""
    row = TABLE_11[phase]
    multi_step = nfe != 1

    def pick(value):  # a (1-NFE, multi-step) pair, or one value for both
        return value[multi_step] if isinstance(value, tuple) else value

    values = dict(prior="standard", lr=row["lr_deep"].get(repeat, pick(row["lr"])), g_lr=None,
                  ot_start=pick(row["ot"][0]),
                  ot_end=PHASE_1_OT_END.get(model, row["ot"][1]) if phase == 1 else row["ot"][1])
    for name in ("ema_reload_every", "d_reload_on_stall", "cg_scale", "augment_p"):
        if row[name] is not None:
            values[name] = pick(row[name])
    if row["cg_scale"] is not None and not multi_step:
        values["cg_t"] = PHASE_4_CG_T
    return values


# ------------------------------------------------------------------------------------------------------------
# The resolution


def resolve(args, given, rows):
    """Fill every flag not typed (given) from the first of rows that sets it -> {flag: where it came from}."""
    source = {name: "typed" for name in given}
    for label, row in rows:
        for name, value in row.items():
            if name not in source:
                setattr(args, name, value)
                source[name] = label
    return source


def run_rows(args, paper, laptop, phase=None):
    """The rows of a run, first to last: [(label, row)]. paper, laptop: the objective's training rows; phase:
    a --phase row or None."""
    if is_laptop(args.model or DATA[args.data]["model"], args.data):
        training = ("laptop row", {**paper, **laptop})
    else:
        training = ("paper's row", paper)
    phase_rows = [(f"--phase {args.phase}", phase)] if phase else []
    return phase_rows + [training, (f"{args.data} row", DATA[args.data])]


def is_laptop(model, data_name):
    return model.startswith("T/") and data_name in LAPTOP_DATA


def describe_sources(source):
    """'laptop row: batch_size, lr, ...; fashion-mnist row: ...' for the console."""
    by_row = {}
    for name, label in source.items():
        by_row.setdefault(label, []).append(name)
    return "; ".join(f"{label}: {', '.join(sorted(names))}" for label, names in by_row.items())


class ArgumentError(data.DataError):
    """Bad flags: every rank raises the same one, rank 0 alone prints it."""


def said_by_rank_0(error):
    return isinstance(error, ArgumentError) and os.environ.get("RANK", "0") != "0"


def check_model_and_data(args):
    """A paper-size model trains on ImageNet latents, with the paper's values: say in one line what to
    give."""
    if args.data in LAPTOP_DATA and not is_laptop(args.model, args.data):
        laptop_models = ", ".join(name for name in MODELS if name.startswith("T/"))
        raise ArgumentError(f"--model {args.model} is a paper-size model: it trains with the paper's values "
                            f"on --data imagenet --data-path LATENTS.npy (from `python vae.py`); on "
                            f"{args.data} use a laptop model ({laptop_models})")
    if args.data == "imagenet" and not args.data_path:
        raise ArgumentError("--data imagenet needs --data-path: a latents .npy from `python vae.py`, or an "
                            "image folder with --vae")


# ------------------------------------------------------------------------------------------------------------
# The flags of a run, shared by train.py and flow_matching.py


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows argparse's default where there is one; a flag whose value comes from the rows says so itself."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def values(name, paper, laptop):
    """'(paper 1e-4; laptop 2e-3)' or '(fashion-mnist 28, ..., imagenet 256)' for --help."""
    if any(name in row for row in DATA.values()):
        return "(" + ", ".join(f"{d} {row[name]}" for d, row in DATA.items() if name in row) + ")"
    shown = [f"paper {paper[name]}"] if name in paper else []
    return "(" + "; ".join(shown + ([f"laptop {laptop[name]}"] if name in laptop else [])) + ")"


def shown_with(paper, laptop):
    """-> shown(name, text): text and the values of the flag name, for --help."""
    return lambda name, text: f"{text} {values(name, paper, laptop)}"


def add_run_arguments(parser, paper, laptop, out_dir, fixed_on_resume):
    """The flags of data, network, optimizer, run length, files and judging. paper and laptop: the objective's
    rows (for 1 NFE), whose values --help shows; fixed_on_resume: the flags --resume cannot change."""
    add = parser.add_argument
    shown = shown_with(paper, laptop)

    add("--data", choices=list(DATA), default="fashion-mnist",
        help="fashion-mnist, mnist, cifar10: downloaded to ./data once (Debian's dataset-fashion-mnist is "
             "found too); folder: root/<class>/<image>; imagenet: a latents .npy from `python vae.py` or an "
             "image folder encoded with --vae")
    add("--data-path", help="dataset location (the MNISTs: the folder of the four IDX files; cifar10: the "
                            "folder of the archive or of cifar-10-batches-py/)")
    add("--image-size", type=int, help=shown("image_size", "pixels"))
    add("--vae", help="sd-vae-ft-mse weights, to encode an ImageNet image folder on the fly")
    add("--model", help=shown("model", f"one of {', '.join(MODELS)}; T/* are the laptop models"))
    add("--batch-size", type=int, help=shown("batch_size", "global batch of each update"))
    add("--lr", type=float, help=shown("lr", "AdamW learning rate"))
    add("--weight-decay", type=float, help=shown("weight_decay", "AdamW weight decay"))
    add("--ema-decay", type=float, help=shown("ema_decay", "EMA of the weights"))
    add("--ema-warmup", type=int, help=shown("ema_warmup", "the EMA decays at min(--ema-decay, (1 + step) / "
                                                           "(warmup + step)); 0: off"))
    add("--flip", action=argparse.BooleanOptionalAction, help=shown("flip", "random horizontal flips"))
    add("--prior", choices=["standard", "data"],
        help=shown("prior", "the flow's noise: N(0, I) as in the paper, or fitted to the data (prior.py)"))
    add("--grad-clip", type=float, help=shown("grad_clip", "max gradient norm"))
    add("--max-steps", type=int, help=shown("max_steps", "steps"))
    add("--max-minutes", type=float,
        help="also stop after this many minutes of training (judging and FID not counted)")
    add("--out-dir", default=out_dir)
    add("--resume", action="store_true", help="continue from --out-dir/ckpt.pt; flags typed now take effect, "
        "except " + ", ".join("--" + name.replace("_", "-") for name in fixed_on_resume))
    add("--overwrite", action="store_true", help="start a new run in an --out-dir that holds one: delete its "
        "checkpoints, log and sample grids first (without it, such a run is refused)")
    add("--seed", type=int, default=0)
    add("--device", help="cuda, mps or cpu (default: the first available)")
    add("--precision", choices=["fp32", "tf32", "bf16"], default="tf32", help="CUDA matmul precision; bf16 "
        "is autocast and opt-in (the paper trains in TF32). CPU always runs fp32")
    add("--num-workers", type=int, help="data-loading processes per rank (imagenet 8; otherwise 0, or 1 for "
        f"a folder of images over {data.SMALL_IMAGE_SIDE} px)")
    add("--ckpt-every", type=int, help=shown("ckpt_every", "steps"))
    add("--keep", type=int, default=0, help="also keep the last N step-stamped checkpoints")
    add("--sample-every", type=int, help=shown("sample_every", "write an EMA sample grid every N steps"))
    add("--log-every", type=int, help=shown("log_every", "steps"))
    add("--max-bad-steps", type=int, default=5,
        help="stop after this many consecutive steps with a non-finite loss or gradient")
    add("--judge-every", type=int, help=shown("judge_every", "every N steps, label class-balanced EMA "
        "samples with a small classifier trained on the real images (quality.py): class accuracy, Frechet "
        "distance, precision and recall in its features; 0: off"))
    add("--judge", help="judge file (default: OUT_DIR/judge.pt, trained there on first use, about a minute "
                        "on a CPU)")
    add("--judge-samples", type=int, default=1000, help="samples per judgement")
    add("--debug", action="store_true", help="show tracebacks for errors")


def validate_run(args, world_size):
    """The checks every objective shares."""
    if args.model not in MODELS:
        raise ArgumentError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
    if args.batch_size <= 0 or args.batch_size % world_size:
        raise ArgumentError(f"--batch-size {args.batch_size} must be positive and divisible by the number of "
                            f"processes ({world_size})")
    if args.judge_every and args.data == "imagenet":
        raise ArgumentError("--judge-every judges small pixel datasets (cifar10, mnist, fashion-mnist, "
                            "folder); on ImageNet use the in-loop FID (--fid-every)")
