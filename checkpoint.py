"""Checkpoint files: written atomically, read without executing anything, checked against the model.

- save(): torch.save to a temporary file in the same directory, flush, fsync, then os.replace over the target.
  A crash at any moment leaves either the old file or the new one, never a torn one.
- load(): torch.load(weights_only=True). A file that needs arbitrary unpickling (a class, a function, a
  `__reduce__` payload) is refused before anything in it runs.
- load_weights(): compares keys and shapes first, so a mismatch is reported as one line naming the first
  offending key, instead of PyTorch's multi-line dump.

And the state of a run, so that a resumed run continues bitwise exactly: the output folder, every rank's
random state (a resumed run draws exactly the numbers it would have drawn), the SIGINT/SIGTERM flag that saves
before exiting, the training clock, the resumed configuration (the checkpoint's, with the flags typed now on
top), and train.py's ckpt.pt itself: what it holds, --keep's step-stamped copies, restoring it.
"""

import contextlib
import os
import pickle
import pickletools
import random
import re
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, unsafe, or does not fit the model. The message is one line."""


def save(obj, path):
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp_path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _pickle_with_globals(path):
    """True when the file is one well-formed pickle that imports something (a class or a function): what a
    code-executing payload needs. Only parses the opcodes; nothing is unpickled."""
    try:
        with open(path, "rb") as f:
            ops = [op.name for op, _, _ in pickletools.genops(f)]
    except Exception:  # not a pickle at all: damaged bytes
        return False
    return bool({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ"} & set(ops))


def load(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a plain (non-torch) pickle makes torch warn about its protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its message for terminals
        found = re.search(r"GLOBAL [\w.]+", message)  # the class or function torch's unpickler refused
        if found is None and not _pickle_with_globals(path):
            raise CheckpointError(f"checkpoint {path} is corrupt (not a readable PyTorch checkpoint)") \
                from None
        reason = found.group(0) if found else "a plain pickle that imports code"
        raise CheckpointError(f"refusing to load {path}: it is not a plain weights file and would need "
                              f"arbitrary unpickling, which can run code ({reason})") from None
    except Exception as e:  # untrusted bytes: any other failure to parse them means a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__})") from None


def mismatches(expected, found):
    """The keys where state dict found does not fit expected: -> (missing, reshaped, unexpected) key lists."""
    missing = [key for key in expected if key not in found]
    reshaped = [key for key in expected
                if key in found and tuple(found[key].shape) != tuple(expected[key].shape)]
    unexpected = [key for key in found if key not in expected]
    return missing, reshaped, unexpected


def first_mismatch(expected, found):
    """One line about the first expected key that is missing or has another shape in found, else the first
    unexpected key; None when found fits."""
    missing, reshaped, unexpected = mismatches(expected, found)
    for key in expected:
        if key in missing:
            return f"missing key {key!r}"
        if key in reshaped:
            return f"key {key!r} has shape {tuple(found[key].shape)}, expected {tuple(expected[key].shape)}"
    return f"unexpected key {unexpected[0]!r}" if unexpected else None


def load_weights(module, state_dict, what="checkpoint"):
    mismatch = first_mismatch(module.state_dict(), state_dict)
    if mismatch is not None:
        raise CheckpointError(f"{what} does not fit the model: {mismatch}")
    module.load_state_dict(state_dict)


# ------------------------------------------------------------------------------------------------------------
# Resumable runs


def check_out_dir(out_dir):
    """Create out_dir, or CheckpointError when it is a file or cannot be written to."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"--out-dir {out_dir} exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--out-dir {out_dir} is not writable ({e.strerror})") from None


def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def gather_rng_states(world_size):
    """Every rank's RNG state, on rank 0 (each rank draws its own noise)."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


class StopFlag:
    """SIGINT/SIGTERM: finish the step, save, exit 0. A second signal exits at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving after this step (signal again to quit at once)",
              file=sys.stderr, flush=True)

    def agreed(self, device, world_size):
        """Every rank stops at the same step: one rank's signal stops all."""
        if world_size == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def flags_given(parser, argv):
    """The destinations of the flags typed on this command line (not those left at their defaults)."""
    defaults, unset = vars(parser.parse_args([])), object()
    parser.set_defaults(**dict.fromkeys(defaults, unset))
    try:
        return {name for name, value in vars(parser.parse_args(argv)).items() if value is not unset}
    finally:
        parser.set_defaults(**defaults)


def resumed_config(saved, current, given, fixed):
    """The configuration a resumed run continues with: the checkpoint's own (saved), then every flag typed now
    (given) on top, so that e.g. `--resume --lr 1e-5` takes effect. Flags that are not in the checkpoint's
    configuration (a newer version of this code) keep their current value. A flag in fixed (what the weights,
    the data position or the random streams depend on) may be repeated but not changed: CheckpointError."""
    for name in sorted(given & set(fixed)):
        if name in saved and saved[name] != current[name]:
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(f"{flag} cannot change on --resume (the checkpoint has {saved[name]!r}, "
                                  f"the command line {current[name]!r}); start a new run, or drop {flag}")
    return {**current, **{k: v for k, v in saved.items() if k in current and k not in given}}


def prepare_out_dir(out_dir):
    """check_out_dir, then remove the temporary files of a process killed while writing (never a
    checkpoint)."""
    check_out_dir(out_dir)
    for name in os.listdir(out_dir):
        if name.startswith(".") and ".pt.tmp" in name:
            os.remove(os.path.join(out_dir, name))


class Clock:
    """The training clock: wall time minus the paused stretches (judging, FID), carried over on resume."""

    def __init__(self, seconds=0.0):
        self.start = time.time() - seconds
        self.paused_seconds = 0.0

    def seconds(self):
        return time.time() - self.start - self.paused_seconds

    @contextlib.contextmanager
    def paused(self):
        tic = time.time()
        try:
            yield
        finally:
            self.paused_seconds += time.time() - tic


# ------------------------------------------------------------------------------------------------------------
# train.py's ckpt.pt: the networks, optimizers, data position and random streams, and the run's configuration


def training_state(nets, args, step, loader, world_size, network_kwargs, extra):
    """What ckpt.pt holds (every rank calls this: the RNG states are gathered on rank 0). extra: the recipe's
    state (fid_tracking, best_D) and the clock (train_seconds)."""
    generator_kwargs, discriminator_kwargs = network_kwargs
    state = {"step": step, "config": vars(args), "generator_kwargs": generator_kwargs,
             "discriminator_kwargs": discriminator_kwargs,
             "G": nets.G.state_dict(), "ema": nets.ema.state_dict(), "D": nets.D.state_dict(),
             "gradnorm": nets.gradnorm.state_dict(), "opt_g": nets.opt_g.state_dict(),
             "opt_d": nets.opt_d.state_dict(), "data": loader.state_dict(),
             "rng": gather_rng_states(world_size)}
    return {**state, **extra}


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def save_training_state(state, nets, out_dir, keep):
    """Atomically write out_dir/ckpt.pt, and keep the last `keep` step-stamped copies (--keep). Never writes
    non-finite weights: -> False instead."""
    if not all_finite(list(nets.G.parameters()) + list(nets.D.parameters()) + list(nets.ema.parameters())):
        print(f"warning: not saving step {state['step']}: the weights are not finite", file=sys.stderr)
        return False
    path = os.path.join(out_dir, "ckpt.pt")
    save(state, path)
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
        raise CheckpointError(f"{source} is not a train.py checkpoint (it needs G, ema, D, gradnorm)")
    for name, module in [("G", nets.G), ("ema", nets.ema), ("D", nets.D), ("gradnorm", nets.gradnorm)]:
        load_weights(module, state[name], what=f"{source} [{name}]")


def restore(nets, state, loader, rank, world_size, args):
    """Everything a checkpoint holds, so that the run continues exactly as if it had never stopped; then the
    learning rates and weight decay of args, which --resume may have changed (an optimizer's state_dict
    carries its own)."""
    load_networks(nets, state, "checkpoint")
    nets.opt_g.load_state_dict(state["opt_g"])
    nets.opt_d.load_state_dict(state["opt_d"])
    for optimizer, lr in ((nets.opt_g, args.g_lr), (nets.opt_d, args.lr)):
        for group in optimizer.param_groups:
            group.update(lr=lr, weight_decay=args.weight_decay)
    loader.load_state_dict(state["data"])
    if len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    else:
        print("warning: resuming with a different number of processes; random streams restart",
              file=sys.stderr)
        torch.manual_seed(state["step"] * 1000 + rank)
