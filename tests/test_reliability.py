"""Reliability and security, as a user sees them: nothing lost on a crash, a preemption, a divergence or bad
input, and no code runs from a checkpoint.

Everything about exit codes, signals and stderr runs the real command line (`python train.py ...`,
`sample.py`, `fid.py`) in a subprocess with OMP_NUM_THREADS=1, then checks what the user sees (the exit code;
one line on stderr that starts with "error:"; no traceback) and what is left on disk. Training runs use a
tiny model (T/4 on 16x16 PNGs, batch 8), so a step takes a fraction of a second; most of the time goes to
starting Python and torch.
"""

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import fid
import train
import vae
from model import MODELS, Generator
from synthetic import make_images

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TIMEOUT = 600  # seconds for one command: generous, the test machine is often shared and slow
SIGNAL_PROMPTLY = 20  # seconds within which a second signal must end the process, on a busy machine


# ------------------------------------------------------------------------------------------------------------
# Helpers


def command(script, *args):
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run(script, *args, env=None):
    """Run one of the repository's scripts to completion -> CompletedProcess (text stdout and stderr)."""
    return subprocess.run(command(script, *args), cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)


def stderr_lines(stderr):
    """Lines as a terminal shows them: progress bars redraw with carriage returns."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip()]


def assert_one_line_error(result, *fragments, code=2):
    """Exit code `code`, exactly one line on stderr mentioning "error:", which starts with it and contains
    every fragment (case-insensitive), and no traceback. Returns that line."""
    tail = result.stderr[-3000:]
    assert result.returncode == code, f"exit code {result.returncode}, expected {code}; stderr:\n{tail}"
    assert "Traceback" not in result.stderr, f"a traceback reached the user:\n{tail}"
    lines = [line for line in stderr_lines(result.stderr) if "error:" in line.lower()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}: {lines}"
    assert lines[0].startswith("error:"), \
        f"the error line does not start with 'error:' (a progress bar?): {lines[0]!r}"
    for fragment in fragments:
        assert str(fragment).lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    assert "error:" not in result.stdout
    return lines[0]


def png_folder(root, per_class=2, size=16, seed=0):
    images, labels = make_images(per_class=per_class, seed=seed, size=size)
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(root / f"class{label}", exist_ok=True)
        Image.fromarray(image).save(root / f"class{label}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """20 PNGs of 16x16 in 10 class folders."""
    return png_folder(tmp_path_factory.mktemp("images"))


def tiny(images, out_dir, *extra):
    """train.py arguments for a tiny, fast run on the PNG folder."""
    return ["--data", "folder", "--data-path", images, "--image-size", "16", "--model", "T/4",
            "--batch-size", "8", "--num-workers", "0", "--sample-every", "100000", "--log-every", "1",
            "--out-dir", out_dir, *extra]


def tensors_finite(obj):
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(tensors_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(tensors_finite(v) for v in obj)
    return True


def assert_complete_checkpoint(path):
    """A checkpoint that loads without unpickling code, has every part train.py writes, and finite weights."""
    state = checkpoint.load(path)  # torch.load(weights_only=True)
    for key in ("step", "G", "ema", "D", "gradnorm", "opt_g", "opt_d", "data", "rng", "config"):
        assert key in state, f"{path} has no {key!r}"
    for key in ("G", "ema", "D", "gradnorm", "opt_g", "opt_d"):
        assert tensors_finite(state[key]), f"{path}: {key} is not finite"
    return state


def assert_identical(a, b, where="state"):
    """Every tensor equal (torch.equal, same dtype), every other value ==, through nested dicts,
    lists, tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Background:
    """train.py in the background, stdout and stderr to files (no pipe to fill up); killed at teardown."""

    def __init__(self, args, log_dir):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"stderr{time.monotonic_ns()}"
        with open(log_dir / "stdout", "a") as stdout, open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(command("train.py", *args), cwd=ROOT, env=ENV, stdout=stdout,
                                         stderr=stderr)

    @property
    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def wait_until(self, condition, what, timeout=TIMEOUT, poll=0.005):
        """Poll condition() until true; fails if the process exits first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"train.py exited ({self.proc.returncode}) before {what}:\n" \
                                             f"{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(poll)

    def wait(self, timeout=TIMEOUT):
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def background(tmp_path):
    started = []

    def start(args):
        started.append(Background(args, tmp_path / "logs"))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def log_steps(out_dir):
    path = Path(out_dir) / "log.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def file_id(path):
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def temp_files(out_dir):
    return [name for name in os.listdir(out_dir) if ".tmp" in name]


TRAINED = ("--max-steps", 4, "--ckpt-every", 1, "--keep", 2)


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """A finished, uninterrupted run with TRAINED's flags: its directory (shared, read-only for the tests)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    result = run("train.py", *tiny(images, out, *TRAINED))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_checkpoint(trained, tmp_path):
    """A fresh --out-dir holding a copy of the trained run's ckpt.pt."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "ckpt.pt", out / "ckpt.pt")
    return out


# ------------------------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line, nothing written where it should not be


def test_unknown_model_lists_the_valid_ones(images, tmp_path):
    result = run("train.py", *tiny(images, tmp_path / "out"), "--model", "Z/9")
    line = assert_one_line_error(result, "Z/9")
    for name in MODELS:
        assert name in line


def test_patches_that_do_not_tile_the_image(images, tmp_path):
    """T/7 on 16-px images: 7-pixel patches leave a remainder. One line before any weights exist, from
    train.py and from classifier.py."""
    result = run("train.py", *tiny(images, tmp_path / "out"), "--model", "T/7")
    assert_one_line_error(result, "T/7", "7 x 7 patches", "16 x 16", "--image-size")
    assert not (tmp_path / "out" / "ckpt.pt").exists()
    result = run("classifier.py", *CLASSIFIER, "--data-path", images, "--model", "T/7", "--out-dir",
                 tmp_path / "c")
    assert_one_line_error(result, "T/7", "7 x 7 patches", "16 x 16", "--image-size")
    assert not (tmp_path / "c" / "classifier.pt").exists()


def test_max_minutes_stops_with_a_checkpoint_and_a_last_grid(images, tmp_path):
    """--max-minutes 1e-6 is over after the first step: the run saves, draws its last grid and exits 0."""
    out = tmp_path / "out"
    result = run("train.py", *tiny(images, out), "--max-steps", "50", "--max-minutes", "1e-6")
    assert result.returncode == 0, result.stderr[-2000:]
    assert checkpoint.load(out / "ckpt.pt")["step"] == 1
    assert sorted(p.name for p in out.glob("samples_*.png")) == ["samples_00000001.png"]


def test_debug_shows_the_traceback(images, tmp_path):
    result = run("train.py", *tiny(images, tmp_path / "out"), "--model", "Z/9", "--debug")
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr and "unknown model 'Z/9'" in result.stderr


def test_missing_data_path(tmp_path):
    result = run("train.py", *tiny("/nonexistent", tmp_path / "out"))
    assert_one_line_error(result, "/nonexistent", "does not exist")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("train.py", *tiny(tmp_path / "empty", tmp_path / "out"))
    assert_one_line_error(result, str(tmp_path / "empty"))


def test_cifar10_offline_says_where_to_put_the_archive(tmp_path):
    """No network (every URL goes to a proxy on a closed port): the line names the URL and where the archive
    goes, and no partial download is left behind."""
    root = tmp_path / "cifar"
    root.mkdir()
    proxy = "http://127.0.0.1:9"
    env = dict(ENV, http_proxy=proxy, https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy)
    result = run("train.py", "--data", "cifar10", "--data-path", root, "--out-dir", tmp_path / "out",
                 "--model", "T/4", "--batch-size", "8", "--num-workers", "0", env=env)
    assert_one_line_error(result, "CIFAR-10", data.CIFAR10_URL, str(root / "cifar-10-python.tar.gz"))
    assert os.listdir(root) == []


def test_batch_size_not_positive(images, tmp_path):
    result = run("train.py", *tiny(images, tmp_path / "out"), "--batch-size", "0")
    assert_one_line_error(result, "--batch-size", "positive")


def test_batch_size_not_divisible_by_world_size_in_process(images, tmp_path):
    args = train.parse_args(tiny(str(images), str(tmp_path / "out"), "--batch-size", "3"))
    with pytest.raises(data.DataError, match="divisible"):
        train.validate(args, world_size=2)
    args = train.parse_args(tiny(str(images), str(tmp_path / "out"), "--batch-size", "4"))
    train.validate(args, world_size=2)


def test_batch_size_not_divisible_under_torchrun(images, tmp_path):
    """Two processes, --batch-size 3: exit code != 0 and the message once (not once per rank).
    torchrun adds its own report (ChildFailedError, with the launcher's traceback) after it: that part
    is torchrun's, not ours."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "train.py"),
         *map(str, tiny(images, tmp_path / "out", "--batch-size", "3", "--device", "cpu"))],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    lines = [line for line in stderr_lines(result.stderr) if line.startswith("error:")]
    assert len(lines) == 1, f"one error line expected, got {len(lines)}: {lines}"
    assert "--batch-size 3" in lines[0] and "divisible" in lines[0]


def test_out_dir_is_a_file(images, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a directory")
    result = run("train.py", *tiny(images, out))
    assert_one_line_error(result, str(out), "not a directory")
    assert out.read_text() == "not a directory"


@pytest.mark.parametrize("how", ["chmod", "read-only location"])
def test_out_dir_not_writable(images, tmp_path, how):
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("running as root: chmod does not stop root from writing")
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
        out = parent / "out"
    else:
        out = Path("/proc/afm-no-such-dir/out")  # nobody, root included, can create a directory in /proc
    try:
        result = run("train.py", *tiny(images, out))
    finally:
        if how == "chmod":
            parent.chmod(0o700)
    assert_one_line_error(result, str(out), "not writable")
    assert not out.exists()


def test_resume_without_checkpoint(images, tmp_path):
    out = tmp_path / "out"
    result = run("train.py", *tiny(images, out), "--resume")
    assert_one_line_error(result, str(out / "ckpt.pt"), "not found")
    assert not (out / "ckpt.pt").exists()


def test_resume_from_random_bytes(images, tmp_path):
    """A damaged file is corrupt, not a security threat: the line must say so, and the file stays for
    inspection."""
    out = tmp_path / "out"
    out.mkdir()
    garbage = np.random.RandomState(0).bytes(4096)
    (out / "ckpt.pt").write_bytes(garbage)
    result = run("train.py", *tiny(images, out), "--resume")
    line = assert_one_line_error(result, str(out / "ckpt.pt"), "corrupt")
    assert "run code" not in line, f"random bytes reported as a code-executing pickle: {line}"
    assert (out / "ckpt.pt").read_bytes() == garbage


def test_damaged_checkpoints_are_reported_as_corrupt(trained, tmp_path):
    """In-process, many damaged files: random bytes of random lengths, and the real checkpoint cut at several
    points. Each must raise CheckpointError saying the file is corrupt: never another exception (which the
    user would see as a traceback), never a claim that it is a pickle that would run code."""
    path, rng = tmp_path / "ckpt.pt", np.random.RandomState(0)
    whole = (trained / "ckpt.pt").read_bytes()
    damaged = [("random", rng.bytes(int(n))) for n in rng.randint(1, 8192, 200)]
    damaged += [(f"first {n} bytes", whole[:n]) for n in np.linspace(0, len(whole) - 1, 6).astype(int)]
    wrong = []
    for what, content in damaged:
        path.write_bytes(content)
        try:
            checkpoint.load(path)
            wrong.append(f"{what}: loaded")
        except checkpoint.CheckpointError as e:
            if "corrupt" not in str(e) or "run code" in str(e):
                wrong.append(f"{what}: {e}")
        except Exception as e:
            wrong.append(f"{what}: {type(e).__name__}: {e}")
    assert not wrong, f"{len(wrong)} of {len(damaged)} damaged files misreported, e.g.:\n" + "\n".join(
        sorted(wrong, key=lambda line: "refusing" in line)[:5])


def test_resume_from_truncated_checkpoint(images, trained, tmp_path):
    out = copy_checkpoint(trained, tmp_path)
    whole = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(whole[:len(whole) // 2])
    result = run("train.py", *tiny(images, out), "--resume")
    assert_one_line_error(result, str(out / "ckpt.pt"), "truncated")
    assert (out / "ckpt.pt").read_bytes() == whole[:len(whole) // 2]


def test_another_model_names_the_first_mismatching_key(images, trained, tmp_path):
    """--init-from a checkpoint of another model: the line names the first key that does not fit. --resume
    with another model is refused before any weights are compared (the model cannot change on resume)."""
    out = copy_checkpoint(trained, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    state = checkpoint.load(out / "ckpt.pt")
    other = Generator(**dict(state["generator_kwargs"], **MODELS["T/2"])).state_dict()
    first = next(key for key, value in other.items()
                 if key not in state["G"] or state["G"][key].shape != value.shape)
    result = run("train.py", *tiny(images, tmp_path / "new"), "--init-from", out / "ckpt.pt",
                 "--model", "T/2")
    assert_one_line_error(result, "does not fit", f"'{first}'")
    result = run("train.py", *tiny(images, out), "--resume", "--model", "T/2")
    assert_one_line_error(result, "--model", "cannot change on --resume", "T/4", "T/2")
    assert (out / "ckpt.pt").read_bytes() == before


def test_sample_with_an_nfe_the_generator_cannot_do(trained, tmp_path):
    result = run("sample.py", "--ckpt", trained / "ckpt.pt", "--nfe", "2", "--out", tmp_path / "s.png",
                 "--device", "cpu")
    assert_one_line_error(result, "--nfe 2")
    assert not (tmp_path / "s.png").exists()


def test_sample_labels_out_of_range(trained, tmp_path):
    result = run("sample.py", "--ckpt", trained / "ckpt.pt", "--labels", "3,10", "--out", tmp_path / "s.png",
                 "--device", "cpu")
    assert_one_line_error(result, "--labels", "10", "0..9")
    assert not (tmp_path / "s.png").exists()


def test_fid_npz_without_arr_0(tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, images=np.zeros((2, 8, 8, 3), np.uint8))
    result = run("fid.py", path, path, "--device", "cpu")
    assert_one_line_error(result, str(path), "arr_0")


def test_fid_inception_weights_with_wrong_keys(tmp_path):
    path, weights = tmp_path / "images.npz", tmp_path / "inception.pth"
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    torch.save({"conv.weight": torch.zeros(3)}, weights)
    result = run("fid.py", path, path, "--weights", weights, "--device", "cpu")
    assert_one_line_error(result, str(weights), "not the FID Inception")


def test_vae_weights_with_wrong_keys(tmp_path):
    latents, weights = tmp_path / "latents.npy", tmp_path / "vae.pth"
    records = np.zeros(8, np.dtype([("latent", "<f2", (2, 4, 2, 2)), ("label", "<i8")]))
    np.save(latents, records)
    torch.save({"conv.weight": torch.zeros(3)}, weights)
    result = run("train.py", "--data", "imagenet", "--data-path", latents, "--vae", weights, "--model", "T/4",
                 "--batch-size", "8", "--num-workers", "0", "--out-dir", tmp_path / "out")
    assert_one_line_error(result, str(weights), "key")


# ------------------------------------------------------------------------------------------------------------
# No code runs from a checkpoint


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_code_executing_pickle(images, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    out.mkdir()
    torch.save(Payload(marker), out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    result = run("train.py", *tiny(images, out), "--resume")
    line = assert_one_line_error(result, str(out / "ckpt.pt"))
    assert "refus" in line.lower() or "unsafe" in line.lower(), line
    assert not marker.exists(), "the checkpoint's payload ran"
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("loader", ["checkpoint.load", "fid.load_inception", "vae.load_vae"])
def test_no_loader_runs_a_pickle_payload(tmp_path, loader):
    """Every place that reads weights: checkpoint.load (resume, --init-from, --d-reload, sample.py), the FID
    Inception and the VAE, each given the payload in torch's zip and legacy formats and as a plain pickle.
    Each refuses with its own one-line error, and the payload never runs."""
    load, error = {"checkpoint.load": (checkpoint.load, checkpoint.CheckpointError),
                   "fid.load_inception": (fid.load_inception, fid.FidError),
                   "vae.load_vae": (vae.load_vae, vae.VAEError)}[loader]
    marker = tmp_path / "pwned"
    for form in ("torch zip", "torch legacy", "plain pickle"):
        path = tmp_path / f"{form.replace(' ', '-')}.pt"
        if form == "plain pickle":
            path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
        else:
            torch.save(Payload(marker), path, _use_new_zipfile_serialization=form == "torch zip")
        with pytest.raises(error) as info:
            load(str(path))
        assert not marker.exists(), f"{loader} ran the payload of a {form} file"
        message = str(info.value).strip()
        assert "\n" not in message, f"{loader}, {form} file: the message is not one line: {message!r}"


# ------------------------------------------------------------------------------------------------------------
# Crash (SIGKILL), preemption (SIGTERM), divergence


def test_sigkill_at_any_time_leaves_a_loadable_checkpoint_and_resume_finishes(images, tmp_path, background):
    """kill -9 three times (once in the middle of writing a checkpoint, twice at seeded random moments after
    one), resuming in between: ckpt.pt always loads and is complete, and the last resume runs to the end."""
    out, max_steps = tmp_path / "out", 24
    args = tiny(images, out, "--max-steps", max_steps, "--ckpt-every", "1")
    ckpt, rng, last_step = out / "ckpt.pt", random.Random(1234), 0
    for kill in range(3):
        process = background(args + (["--resume"] if kill else []))
        previous = file_id(ckpt)
        process.wait_until(lambda: file_id(ckpt) not in (None, previous), "a new ckpt.pt")
        # kill == 0: in the middle of writing the next one (killed runs leave their temporary files behind)
        if kill == 0:
            stale = set(temp_files(out))
            process.wait_until(lambda: set(temp_files(out)) - stale, "a checkpoint being written", poll=0.001)
        else:
            time.sleep(rng.uniform(0, 0.5))
        assert process.proc.poll() is None, "the run ended before it could be killed: make it longer"
        process.kill()
        state = assert_complete_checkpoint(ckpt)
        assert last_step <= state["step"] < max_steps
        last_step = state["step"]
    result = run("train.py", *args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert assert_complete_checkpoint(ckpt)["step"] == max_steps


def test_sigterm_saves_and_the_resumed_run_is_bitwise_identical(images, trained, tmp_path, background):
    """The same run as `trained`, stopped by SIGTERM after its first logged step and resumed: every tensor of
    the final state equals the uninterrupted run's."""
    steps = TRAINED[1]
    b = tmp_path / "b"
    process = background(tiny(images, b, *TRAINED))
    process.wait_until(lambda: log_steps(b) >= 1, "a logged step")
    process.proc.send_signal(signal.SIGTERM)
    assert process.wait() == 0, process.stderr[-3000:]
    stopped_at = assert_complete_checkpoint(b / "ckpt.pt")["step"]
    assert 1 <= stopped_at < steps, "the run finished before the signal: make it longer"
    resumed = run("train.py", *tiny(images, b, *TRAINED), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a_state, b_state = checkpoint.load(trained / "ckpt.pt"), checkpoint.load(b / "ckpt.pt")
    assert a_state["step"] == b_state["step"] == steps
    for key in ("G", "ema", "D", "gradnorm", "opt_g", "opt_d", "data", "rng", "generator_kwargs",
                "discriminator_kwargs", "fid_tracking"):
        assert_identical(a_state[key], b_state[key], key)


def test_a_second_signal_exits_at_once(images, tmp_path, background):
    out = tmp_path / "out"
    process = background(tiny(images, out, "--max-steps", "100000", "--ckpt-every", "100000"))
    process.wait_until(lambda: log_steps(out) >= 1, "a logged step")
    process.proc.send_signal(signal.SIGTERM)
    process.wait_until(lambda: "saving after this step" in process.stderr, "the first signal's message",
                       timeout=60)
    process.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    try:
        code = process.wait(timeout=SIGNAL_PROMPTLY)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {SIGNAL_PROMPTLY} s after the second SIGTERM")
    # 128 + SIGTERM when the second signal arrived mid-step or mid-save, 0 if the first one's save
    # had finished
    assert code in (0, 128 + signal.SIGTERM), process.stderr[-3000:]
    assert time.monotonic() - sent < SIGNAL_PROMPTLY
    if (out / "ckpt.pt").exists():  # whatever is there is whole
        assert_complete_checkpoint(out / "ckpt.pt")


def test_divergence_stops_with_exit_3_and_keeps_the_checkpoint_finite(images, tmp_path):
    """--lr 1e30: the first D update blows D's weights up to ~1e30, and from then on G's loss (step 1) and
    every loss is NaN. --max-bad-steps 2: the run stops at step 2."""
    out = tmp_path / "out"
    result = run("train.py", *tiny(images, out, "--max-steps", "100", "--ckpt-every", "1", "--lr", "1e30",
                                   "--max-bad-steps", "2"))
    assert result.returncode == 3, result.stderr[-3000:]
    if (out / "ckpt.pt").exists():
        assert_complete_checkpoint(out / "ckpt.pt")
    assert_one_line_error(result, "non-finite", "step 2", code=3)


def test_divergence_names_the_last_good_checkpoint_and_keeps_it(images, trained, tmp_path):
    """Resume the 4-step run with --gp-scale 1e30 (every D gradient is inf from then on): steps 5 and 6 are
    bad and the run stops at step 6 (--max-bad-steps 2). The last good checkpoint is step 4's; the
    checkpoints a bad streak would write must not replace it (they hold whatever the bad steps did, e.g. the
    1e30 weights of --lr 1e30)."""
    out = copy_checkpoint(trained, tmp_path)
    good = (out / "ckpt.pt").read_bytes()
    result = run("train.py", *tiny(images, out, "--max-steps", "100", "--ckpt-every", "1",
                                   "--gp-scale", "1e30", "--max-bad-steps", "2"), "--resume")
    assert result.returncode == 3, result.stderr[-3000:]
    assert_complete_checkpoint(out / "ckpt.pt")
    assert checkpoint.load(out / "ckpt.pt")["step"] == 4, \
        "the last good checkpoint was replaced during the bad steps"
    assert (out / "ckpt.pt").read_bytes() == good
    assert_one_line_error(result, "non-finite", "step 6", str(out / "ckpt.pt"), "step 4", code=3)


# ------------------------------------------------------------------------------------------------------------
# Resuming with other flags; the classifier's command line; guidance defaults


def test_resume_takes_a_new_learning_rate_and_config_records_what_runs(images, trained, tmp_path):
    """The divergence message says: lower --lr and resume. So --resume --lr must reach the optimizers (their
    state_dict carries the old rate), G's rate must keep its ratio to D's (the folder preset trains G at 1e-3,
    half of D's 2e-3), the log must show both, and config.json must record what runs: the new rates, and the
    checkpoint's values of the flags not typed again (TRAINED's --ckpt-every 1 and --keep 2)."""
    out = copy_checkpoint(trained, tmp_path)
    trained_config = checkpoint.load(out / "ckpt.pt")["config"]
    assert (trained_config["lr"], trained_config["g_lr"]) == (2e-3, 1e-3)
    result = run("train.py", *tiny(images, out, "--max-steps", 6, "--lr", "1e-3"), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == [5, 6]
    assert all((r["lr_d"], r["lr_g"]) == (1e-3, 5e-4) for r in records), records
    config = json.load(open(out / "config.json"))
    assert (config["lr"], config["g_lr"], config["max_steps"]) == (1e-3, 5e-4, 6)
    assert config["ckpt_every"] == 1 and config["keep"] == 2
    assert checkpoint.load(out / "ckpt.pt")["config"] == config


def test_resume_refuses_to_change_what_the_checkpoint_depends_on(images, trained, tmp_path):
    """The batch size fixes the data position and the random streams: a new one is one line and exit 2, and
    the checkpoint is left as it was. Repeating the same value (tiny() passes --model T/4 again) is fine."""
    out = copy_checkpoint(trained, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    result = run("train.py", *tiny(images, out, "--max-steps", 6, "--batch-size", 4), "--resume")
    assert_one_line_error(result, "--batch-size", "cannot change on --resume", "8", "4")
    assert (out / "ckpt.pt").read_bytes() == before and not (out / "config.json").exists()


CLASSIFIER = ("--data", "folder", "--image-size", "16", "--model", "T/4", "--batch-size", "8",
              "--num-workers", "0")


def test_classifier_divergence_exits_3_through_both_commands(images, tmp_path):
    """`python train.py --train-classifier` forwards to `python classifier.py`; a diverging
    classifier run is one `error:` line and exit code 3 through either (train.py used to import
    itself twice and miss the exception)."""
    flags = [*CLASSIFIER, "--data-path", images, "--max-steps", "50", "--lr", "1e30", "--max-bad-steps", "2"]
    for result in (run("train.py", "--train-classifier", *flags, "--out-dir", tmp_path / "alias"),
                   run("classifier.py", *flags, "--out-dir", tmp_path / "direct")):
        assert_one_line_error(result, "non-finite", "lower --lr", code=3)


def test_multistep_guidance_defaults_to_the_papers_target_times(images, tmp_path):
    """`--nfe 2 --classifier C.pt --cg-scale 0.02` without --cg-target-times guides at t in {0} (Table 11);
    for a step count the paper gives none for, the run stops with one line that says what to pass."""
    made = run("classifier.py", *CLASSIFIER, "--data-path", images, "--max-steps", "1",
               "--out-dir", tmp_path / "c")
    assert made.returncode == 0, made.stderr[-3000:]
    guided = ("--classifier", tmp_path / "c" / "classifier.pt", "--cg-scale", "0.02", "--prior", "standard")
    out = tmp_path / "nfe2"
    result = run("train.py", *tiny(images, out, "--max-steps", 2, "--nfe", 2, *guided))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(out / "config.json"))["cg_target_times"] == "0"
    assert all("g_cg" in json.loads(line) for line in open(out / "log.jsonl"))
    result = run("train.py", *tiny(images, tmp_path / "nfe3", "--max-steps", 2, "--nfe", 3, *guided))
    assert_one_line_error(result, "--cg-target-times", "--nfe 3", "0, 0.333333, 0.666667")


# ------------------------------------------------------------------------------------------------------------
# Corrupt images, --keep


def test_corrupt_images_are_skipped_and_named(images, tmp_path):
    """6 good images and 2 bad ones (random bytes; a PNG cut in half), batch 8: every epoch meets both bad
    files, and each is named once."""
    folder = tmp_path / "images"
    for path in sorted(images.glob("class[0-5]/*.png"))[::2]:
        (folder / path.parent.name).mkdir(parents=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    garbage, cut = folder / "class0" / "garbage.png", folder / "class1" / "cut.png"
    garbage.write_bytes(np.random.RandomState(0).bytes(500))
    whole = next(images.glob("class1/*.png")).read_bytes()
    cut.write_bytes(whole[:len(whole) // 2])
    assert len(list(folder.glob("*/*.png"))) == 8

    out = tmp_path / "out"
    result = run("train.py", *tiny(folder, out, "--max-steps", "1"))  # 1 step = 2 batches = 2 epochs
    assert result.returncode == 0, result.stderr[-3000:]
    assert assert_complete_checkpoint(out / "ckpt.pt")["step"] == 1
    warnings = [line for line in stderr_lines(result.stderr) if line.startswith("warning:")]
    for bad in (garbage, cut):
        named = [line for line in warnings if str(bad) in line]
        assert len(named) == 1, f"{bad} should be named in exactly one warning, got {named}"


def test_every_image_corrupt(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.RandomState(0)
    for k in range(2):
        (folder / f"class{k}").mkdir(parents=True)
        for i in range(4):
            (folder / f"class{k}" / f"{i}.png").write_bytes(rng.bytes(300))
    result = run("train.py", *tiny(folder, tmp_path / "out", "--max-steps", "2"))
    assert_one_line_error(result, "no readable image", str(folder))
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_keep_leaves_ckpt_and_the_last_two_stamped_files(trained):
    checkpoints = sorted(name for name in os.listdir(trained) if name.startswith("ckpt") or ".tmp" in name)
    assert checkpoints == ["ckpt-00000003.pt", "ckpt-00000004.pt", "ckpt.pt"]
    assert checkpoint.load(trained / "ckpt-00000003.pt")["step"] == 3
    assert (trained / "ckpt-00000004.pt").read_bytes() == (trained / "ckpt.pt").read_bytes()
