"""Checkpoint files: written atomically, read without executing anything, checked against the model.

- save(): torch.save to a temporary file in the same directory, flush, fsync, then os.replace over the target.
  A crash at any moment leaves either the old file or the new one, never a torn one; a failed write (a full
  disk) is a runtime.WriteError that names the file and the cause.
- load(): torch.load(weights_only=True). A file that needs arbitrary unpickling (a class, a function, a
  `__reduce__` payload) is refused before anything in it runs.
- load_weights(): compares keys and shapes first, so a mismatch is reported as one line naming the first
  offending key, instead of PyTorch's multi-line dump.

And the state of a run, so that a resumed run continues bitwise exactly: the output folder (one run's at a
time, never written over unasked; a failed write reported with what is left), every rank's random state (a
resumed run draws exactly the numbers it would have drawn), the SIGINT/SIGTERM flag that saves before exiting,
the training clock, the resumed configuration (the checkpoint's, with the flags typed now on top), and
train.py's ckpt.pt itself: what it holds, --keep's step-stamped copies, restoring it.
"""

import argparse
import contextlib
import errno
import fcntl
import glob
import json
import os
import pickle
import pickletools
import random
import re
import shutil
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

import runtime


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, unsafe, or does not fit the model. The message is one line."""


# torch.save's zip writer reports a failed write as a RuntimeError of its own ("[enforce fail at
# inline_container.cc:672] . unexpected pos ...", "PytorchStreamWriter failed writing file ...").
ZIP_WRITER_FAILED = re.compile(r"inline_container\.cc|PytorchStreamWriter failed")
NEARLY_FULL = 1 << 20  # bytes: a write that failed with less than this free ran out of space


def save(obj, path):
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with runtime.writing(path):
        try:
            with open(tmp_path, "wb") as f:
                try:
                    torch.save(obj, f)
                except RuntimeError as error:
                    if not ZIP_WRITER_FAILED.search(str(error)):
                        raise
                    raise zip_writer_cause(error, directory) from None
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


def zip_writer_cause(error, directory):
    """The OSError behind torch's zip writer failing: the one it failed during, if it kept it; else no space
    left on device when the disk is full (checked while the temporary file still fills it); else EIO."""
    if isinstance(error.__context__, OSError):
        return error.__context__
    if shutil.disk_usage(directory).free < NEARLY_FULL:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, f"PyTorch's zip writer failed ({str(error).splitlines()[0]})")


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


def write_config(out_dir, config):
    """out_dir/config.json: the run's full configuration, for people and tools (ckpt.pt holds its own)."""
    path = os.path.join(out_dir, "config.json")
    with runtime.writing(path), open(path, "w") as f:
        json.dump(config, f, indent=2)


def check_out_dir(out_dir):
    """Create out_dir, or CheckpointError when it is a file or cannot be written to."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"--out-dir {out_dir} exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test.tmp{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--out-dir {out_dir} is not writable ({e.strerror})") from None


# What train.py and flow_matching.py write in --out-dir; the .pt files are the run's checkpoints.
RUN_FILES = ("ckpt.pt", "ckpt-*.pt", "best.pt", "log.jsonl", "config.json", "samples_*.png")


def claim_out_dir(out_dir, run_files, resume, overwrite, rank, world_size):
    """Make out_dir this run's own, before anything is written there. Rank 0 does it for the ranks of a
    torchrun, which share the folder; when it cannot, the other ranks exit with its code 2 and say nothing,
    as rank 0 says why (instead of failing at their next collective, when rank 0 has gone)."""
    failed = None
    if rank == 0:
        try:
            own_out_dir(out_dir, run_files, resume, overwrite)
        except Exception as error:  # raised again below, once the other ranks know
            failed = error
    if world_size > 1:
        outcome = [failed is not None]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] and rank != 0:
            raise SystemExit(2)
    if failed is not None:
        raise failed


def own_out_dir(out_dir, run_files, resume, overwrite):
    """claim_out_dir's work. run_files: glob patterns of what the run writes in out_dir; those ending in .pt
    are its checkpoints. CheckpointError (one line) when

    - another live process owns out_dir (the line names its pid);
    - a new run (not resume) would start where a checkpoint is, unless overwrite: that deletes run_files
      there first.

    Then the temporary files of processes killed while writing are removed; a live process's stay."""
    if resume and overwrite:
        raise CheckpointError("--resume continues the run in --out-dir and --overwrite deletes it: pass one")
    check_out_dir(out_dir)
    lock(out_dir)
    if not resume:
        found = run_files_in(out_dir, run_files)
        checkpoints = [path for path in found if path.endswith(".pt")]
        if checkpoints and not overwrite:
            step = saved_step(checkpoints[0])
            raise CheckpointError(
                f"--out-dir {out_dir} holds a run ({checkpoints[0]}, "
                f"{'unreadable' if step is None else f'step {step}'}): --resume continues it; to start a new "
                f"one, pass another --out-dir, or --overwrite to delete that run's files first")
        for path in found if overwrite else []:
            os.remove(path)
    remove_temporary_files_of_dead_processes(out_dir)


LOCK_NAME = ".lock"  # in every run folder: the pid of the process that owns it
_held = []  # the descriptors of the lock files this process holds, open until it exits


def lock(out_dir):
    """Own out_dir until this process exits: a POSIX lock on out_dir/.lock, which the kernel drops when its
    process ends, however it ends (kill -9 included). Not flock(): a data-loader worker forked from the run
    would share that lock and keep the folder after its parent is killed; a POSIX lock is one process's.
    CheckpointError when another process holds it."""
    path = os.path.join(out_dir, LOCK_NAME)
    # Held already (a second run in this process, e.g. a test): opening it again and closing that descriptor
    # would drop the lock, as POSIX locks go.
    if os.path.exists(path) and any(os.path.samestat(os.fstat(fd), os.stat(path)) for fd in _held):
        return
    with runtime.writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if error.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks (some NFS)
                print(f"warning: cannot lock {path} ({error.strerror}): nothing stops a second run from "
                      f"writing into {out_dir} at the same time", file=sys.stderr)
                return
            who = f"pid {holder}" if holder.isdigit() else "its pid not yet written"
            raise CheckpointError(f"--out-dir {out_dir} is in use by another run ({who}): wait for it to "
                                  f"end, or pass another --out-dir") from None
        _held.append(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())


def run_files_in(out_dir, run_files):
    """The files in out_dir matching the glob patterns run_files: pattern by pattern, the last name first."""
    return [path for pattern in run_files
            for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), pattern)), reverse=True)]


def saved_step(path):
    """The step of the checkpoint at path, read without reading its tensors (they are memory-mapped); None
    when it does not load (missing, truncated, corrupt, or not a torch.save zip file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # untrusted bytes: any failure to parse them means a damaged file
        return None
    return state.get("step") if isinstance(state, dict) else None


TEMPORARY_FILE = re.compile(r"\..+\.tmp(\d+)")  # save()'s .NAME.tmpPID, and check_out_dir's probe


def remove_temporary_files_of_dead_processes(out_dir):
    for name in os.listdir(out_dir):
        found = TEMPORARY_FILE.fullmatch(name)
        if found and not process_alive(int(found.group(1))):
            os.remove(os.path.join(out_dir, name))


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


@contextlib.contextmanager
def reporting_write_errors(ckpt_path):
    """Around a training run (a context manager, or a decorator of the run's body): a file that cannot be
    written (runtime.WriteError: no space left, ...) ends it with one line that also says what ckpt_path
    holds, loaded to check: the last checkpoint, intact, or none."""
    try:
        yield
    except runtime.WriteError as error:
        step = saved_step(ckpt_path)
        if step is not None:
            left = f"the last checkpoint, {ckpt_path} (step {step}), is intact: --resume continues from it"
        elif os.path.exists(ckpt_path):
            left = f"{ckpt_path} does not load"
        else:
            left = "no checkpoint was written yet"
        raise runtime.WriteError(f"{error}; {left}") from None


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


# Flags about this command alone, which a resumed run never takes from its checkpoint.
THIS_COMMAND_ONLY = {"out_dir", "resume", "overwrite"}


def resumed_config(saved, current, given, fixed):
    """The configuration a resumed run continues with: the checkpoint's own (saved), then every flag typed now
    (given, and THIS_COMMAND_ONLY) on top, so that e.g. `--resume --lr 1e-5` takes effect. Flags that are not
    in the checkpoint's configuration (a newer version of this code) keep their current value. A flag in fixed
    (what the weights, the data position or the random streams depend on) may be repeated but not changed:
    CheckpointError."""
    for name in sorted(given & set(fixed)):
        if name in saved and saved[name] != current[name]:
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(f"{flag} cannot change on --resume (the checkpoint has {saved[name]!r}, "
                                  f"the command line {current[name]!r}); start a new run, or drop {flag}")
    kept = given | THIS_COMMAND_ONLY
    return {**current, **{k: v for k, v in saved.items() if k in current and k not in kept}}


def resume(args, given, fixed):
    """-> (args, the checkpoint's state or None). With --resume: the checkpoint's flags, except those
    typed now (given), and the state of out_dir/ckpt.pt."""
    if not args.resume:
        return args, None
    state = load_training_state(args.out_dir)
    resumed = argparse.Namespace(**resumed_config(state["config"], vars(args), given, fixed))
    if "lr" in given and "g_lr" not in given and "g_lr" in state["config"]:  # G's rate keeps its ratio to D's
        resumed.g_lr = state["config"]["g_lr"] * resumed.lr / state["config"]["lr"]
    return resumed, state


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
# A run's ckpt.pt (train.py builds it): the networks, optimizers, data position and random streams, and the
# run's configuration


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def save_training_state(state, modules, out_dir, keep):
    """Atomically write out_dir/ckpt.pt, and keep the last `keep` step-stamped copies (--keep). Never writes
    the state while a network in modules has non-finite weights: -> False instead."""
    if not all_finite([p for module in modules for p in module.parameters()]):
        print(f"warning: not saving step {state['step']}: the weights are not finite", file=sys.stderr)
        return False
    path = os.path.join(out_dir, "ckpt.pt")
    save(state, path)
    if keep > 0:
        stamped = os.path.join(out_dir, f"ckpt-{state['step']:08d}.pt")
        with runtime.writing(stamped):
            if os.path.exists(stamped):
                os.remove(stamped)
            os.link(path, stamped)  # a second name for the same finished file: atomic and free
            old = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt-") and f.endswith(".pt"))
            for name in old[:-keep]:
                os.remove(os.path.join(out_dir, name))
    return True


def load_training_state(out_dir):
    """out_dir/ckpt.pt, to resume from. When it does not load, the CheckpointError also names the newest
    --keep copy that does; --resume never falls back to it unasked."""
    path = os.path.join(out_dir, "ckpt.pt")
    try:
        return load(path)
    except CheckpointError as error:
        for copy in sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt-*.pt")), reverse=True):
            step = saved_step(copy)
            if step is not None:
                raise CheckpointError(f"{error}; the newest complete copy is {copy} (step {step}): copy it "
                                      f"to {path} to resume from it") from None
        raise


def load_networks(nets, state, source):
    """G, EMA, D and the gradient-normalization EMA from a train.py checkpoint (resume, or --init-from)."""
    if not isinstance(state, dict) or not all(k in state for k in ("G", "ema", "D", "gradnorm")):
        raise CheckpointError(f"{source} is not a train.py checkpoint (it needs G, ema, D, gradnorm)")
    for name, module in [("G", nets.G), ("ema", nets.ema), ("D", nets.D), ("gradnorm", nets.gradnorm)]:
        load_weights(module, state[name], what=f"{source} [{name}]")


def restore_position(state, loader, rank, world_size):
    """The data position and this rank's random streams of a checkpoint, so that the run continues exactly as
    if it had never stopped (the networks and optimizers are the objective's to load)."""
    loader.load_state_dict(state["data"])
    if len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    else:
        print("warning: resuming with a different number of processes; random streams restart",
              file=sys.stderr)
        torch.manual_seed(state["step"] * 1000 + rank)
