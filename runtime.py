"""What every entry point shares: the processes and the device it runs on, the matmul precision, how an
error (a file that cannot be written too) becomes a one-line message and an exit code, and a training run's
log.

train.py, classifier.py, sample.py, fid.py, vae.py and bench.py all start here, so that --device, torchrun and
the exit codes mean the same in each. It imports nothing of ours.
"""

import contextlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm


def default_device():
    """The first available of cuda, mps, cpu."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def setup_distributed(device_arg=None):
    """-> rank, world_size, device. Under torchrun: NCCL on CUDA, gloo on CPU. Plain python: one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg or default_device())
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = torch.cuda.is_available() and device_arg in (None, "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def set_precision(precision, device):
    """TF32 matmuls unless "fp32" (the paper trains in TF32); -> the autocast context of the forward passes:
    bf16 only when asked for, on CUDA. CPUs without bf16 units run autocast far slower than fp32."""
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


class Diverged(Exception):
    """A training run's loss or gradients stayed non-finite for too many consecutive steps (exit code 3)."""

    @staticmethod
    def message(bad_steps, step, out_dir, last_saved_step):
        ckpt_path = os.path.join(out_dir, "ckpt.pt")
        where = "no checkpoint was written"
        if last_saved_step is not None:
            where = f"the last good checkpoint is {ckpt_path} (step {last_saved_step})"
        return (f"the loss became non-finite: {bad_steps} consecutive steps up to step {step} were skipped; "
                f"{where}. Lower --lr or resume from the checkpoint")


class WriteError(Exception):
    """A file could not be written (no space left on device, an I/O error, ...). The message is one line."""


@contextlib.contextmanager
def writing(path):
    """An OSError inside becomes a WriteError that names path and the cause: a failed write() or flush()
    names no file itself."""
    try:
        yield
    except OSError as error:
        raise WriteError(f"could not write {path}: {error.strerror or error}") from None


def run(body, debug, codes, quiet=lambda error: False):
    """body() -> 0; or, for an error of a class in codes ({class or tuple of classes: exit code}, first
    match wins), one line "error: ..." on stderr (unless quiet(error)) and its exit code. A WriteError is exit
    code 2 in every entry point. With debug (--debug) the error is raised, with its traceback."""
    codes = {WriteError: 2, **codes}
    classes = tuple(c for key in codes for c in (key if isinstance(key, tuple) else (key,)))
    try:
        body()
    except classes as error:
        if debug:
            raise
        if not quiet(error):
            print(f"error: {error}", file=sys.stderr)
        return next(code for key, code in codes.items() if isinstance(error, key))
    return 0


class TrainingLog:
    """A training run's log (train.py, classifier.py): one JSON line per record in a .jsonl file, and a tqdm
    progress bar; both on rank 0 only. Per-step metrics (dicts of 0-d tensors) are queued with add() and
    averaged by averages(): one host sync per logging interval, not one per step."""

    def __init__(self, path, max_steps, step, batch_size, main_process):
        self.path = path
        with writing(path):
            self.file = open(path, "a") if main_process else None
        self.progress = tqdm(total=max_steps, initial=step, disable=not main_process, dynamic_ncols=True)
        self.batch_size = batch_size
        self.pending = []
        self.tic = time.time()
        self.tic_step = step

    def add(self, metrics):
        self.pending.append(metrics)

    def averages(self, step):
        """-> (mean of each queued metric, images per second since the last call); empties the queue."""
        names = list(self.pending[0])
        # (steps, metrics)
        stacked = torch.stack([torch.stack([m[n].float() for n in names]) for m in self.pending])
        img_per_s = (step - self.tic_step) * self.batch_size / max(time.time() - self.tic, 1e-9)
        self.pending = []
        self.tic = time.time()
        self.tic_step = step
        return dict(zip(names, stacked.mean(0).tolist())), img_per_s

    def __call__(self, record, message=None):
        """Write record; print "step N: message" (or the record's event) above the progress bar."""
        if self.file is not None:
            with writing(self.path):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            if message or "event" in record:
                self.progress.write(f"step {record['step']}: {message or record['event']}")

    def close(self):
        self.progress.close()
        if self.file is not None:
            with writing(self.path):  # after a failed write, closing tries to write its line again
                self.file.close()
