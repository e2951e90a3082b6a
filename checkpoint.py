"""Checkpoint files: written atomically, read without executing anything, checked against the model.

- save(): torch.save to a temporary file in the same directory, flush, fsync, then os.replace over the target.
  A crash at any moment leaves either the old file or the new one, never a torn one.
- load(): torch.load(weights_only=True). A file that needs arbitrary unpickling (a class, a function, a
  `__reduce__` payload) is refused before anything in it runs.
- load_weights(): compares keys and shapes first, so a mismatch is reported as one line naming the first
  offending key, instead of PyTorch's multi-line dump.
"""

import os
import pickle
import pickletools
import re
import warnings

import torch


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
        with warnings.catch_warnings():  # a plain (non-torch) pickle makes torch warn about its protocol first
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its message for terminals
        found = re.search(r"GLOBAL [\w.]+", message)  # the class or function torch's unpickler refused
        if found is None and not _pickle_with_globals(path):
            raise CheckpointError(f"checkpoint {path} is corrupt (not a readable PyTorch checkpoint)") from None
        reason = found.group(0) if found else "a plain pickle that imports code"
        raise CheckpointError(f"refusing to load {path}: it is not a plain weights file and would need "
                              f"arbitrary unpickling, which can run code ({reason})") from None
    except Exception as e:  # untrusted bytes: any other failure to parse them means a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__})") from None


def first_mismatch(module, state_dict):
    """A one-line description of the first key or shape that differs, or None when the state fits."""
    expected = module.state_dict()
    for key, value in expected.items():
        if key not in state_dict:
            return f"missing key {key!r}"
        if tuple(state_dict[key].shape) != tuple(value.shape):
            return f"{key!r} has shape {tuple(state_dict[key].shape)}, the model expects {tuple(value.shape)}"
    for key in state_dict:
        if key not in expected:
            return f"unexpected key {key!r}"
    return None


def load_weights(module, state_dict, what="checkpoint"):
    mismatch = first_mismatch(module, state_dict)
    if mismatch is not None:
        raise CheckpointError(f"{what} does not fit the model: {mismatch}")
    module.load_state_dict(state_dict)
