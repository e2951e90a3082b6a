"""A run's folder is its own: no second run writes into it, a full disk is one clear line, and a corrupt
checkpoint points to the copy that is good.

As in test_reliability.py, the command line runs in a subprocess (tiny runs: T/4 on 16x16 PNGs, batch 8) and
the tests check what the user sees (exit code, one `error:` line, no traceback) and what is left on disk. A
failed write is made two ways: a real full disk (a small tmpfs, where this process may mount one), and torch's
zip writer failing as it does on a full disk, injected through a sitecustomize.py in the subprocess.
"""

import errno
import json
import os
import shutil
import signal
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import runtime
import sample
import test_reliability
from test_reliability import (ENV, ROOT, TIMEOUT, assert_complete_checkpoint, assert_one_line_error,
                              log_steps, run, stderr_lines, temp_files, tiny)

ZIP_WRITER_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
SHORT = ("--max-steps", 4, "--ckpt-every", 2)
CLASSIFIER = ("--data", "folder", "--image-size", "16", "--model", "T/4", "--batch-size", "8",
              "--num-workers", "0", "--log-every", "1")
FLOW_MATCHING = ("--data", "folder", "--image-size", "16", "--model", "T/4", "--batch-size", "8",
                 "--num-workers", "0", "--log-every", "1", "--sample-every", "100000", "--judge-every", "0")


images = test_reliability.images          # fixtures shared with test_reliability.py: 20 PNGs of 16x16,
background = test_reliability.background  # and train.py runs in the background, killed at teardown


def flags(script, images, out_dir, *extra):
    """Tiny-run flags of each entry point that writes a run folder."""
    common = {"train.py": tiny(images, out_dir)[:-2], "classifier.py": [*CLASSIFIER, "--data-path", images],
              "flow_matching.py": [*FLOW_MATCHING, "--data-path", images]}[script]
    return [*common, "--out-dir", out_dir, *extra]


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """A finished train.py run of 4 steps, a checkpoint at every step, the last two kept as copies."""
    out = tmp_path_factory.mktemp("finished") / "out"
    result = run("train.py", *tiny(images, out, "--max-steps", 4, "--ckpt-every", 1, "--keep", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_run(finished, tmp_path):
    """A copy of the finished run's folder, with ckpt.pt a second name of its newest copy, as train.py
    leaves it."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    os.remove(out / "ckpt.pt")
    os.link(out / "ckpt-00000004.pt", out / "ckpt.pt")
    return out


def contents(out):
    """Every file in out but the lock: name -> bytes."""
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))
            if name != checkpoint.LOCK_NAME}


# ------------------------------------------------------------------------------------------------------------
# One run per folder


def test_a_second_run_is_refused_while_the_first_runs_on(images, tmp_path, background):
    """The second process names the first one's pid and exits 2 at once, writing nothing; the first, stopped
    by SIGTERM later, ends with its checkpoint and every log line."""
    out = tmp_path / "out"
    first = background(tiny(images, out, "--max-steps", 100000, "--ckpt-every", 2))
    first.wait_until(lambda: log_steps(out) >= 1, "a logged step")
    second = run("train.py", *tiny(images, out, *SHORT))
    assert_one_line_error(second, str(out), "in use", f"pid {first.proc.pid}")
    assert first.proc.poll() is None, "the first run ended before the second one tried: make it longer"
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 0, first.stderr[-3000:]
    steps = assert_complete_checkpoint(out / "ckpt.pt")["step"]
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert json.load(open(out / "config.json"))["max_steps"] == 100000  # the first run's, not the second's
    assert temp_files(out) == []


@pytest.mark.parametrize("script", ["classifier.py", "flow_matching.py"])
def test_every_entry_point_refuses_a_folder_in_use(images, tmp_path, script):
    """This process holds the folder's lock: classifier.py and flow_matching.py are refused, naming its
    pid."""
    out = tmp_path / "out"
    out.mkdir()
    checkpoint.lock(out)
    result = run(script, *flags(script, images, out, *SHORT))
    assert_one_line_error(result, str(out), "in use", f"pid {os.getpid()}")
    assert os.listdir(out) == [checkpoint.LOCK_NAME]


def test_under_torchrun_rank_0_claims_the_folder_and_says_why_it_cannot(images, tmp_path):
    """Two processes into a folder this process holds: one error line, naming its pid, and no traceback from
    rank 1 (which stops with rank 0 instead of failing at its next collective). The report after it is
    torchrun's."""
    out = tmp_path / "out"
    out.mkdir()
    checkpoint.lock(out)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "train.py"), *map(str, tiny(images, out, *SHORT, "--device", "cpu"))],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    lines = [line for line in stderr_lines(result.stderr) if line.startswith("error:")]
    assert len(lines) == 1 and "in use" in lines[0] and f"pid {os.getpid()}" in lines[0], lines
    assert "[rank1]" not in result.stderr, result.stderr[-3000:]


def test_kill_9_leaves_no_lock_behind_and_resume_cleans_up(images, tmp_path, background):
    """kill -9 (with a data-loader worker, which outlives its parent for a moment): --resume at once owns
    the folder, removes the temporary files of dead processes and keeps those of live ones."""
    out = tmp_path / "out"
    first = background(tiny(images, out, "--max-steps", 100000, "--ckpt-every", 1, "--num-workers", 1))
    first.wait_until(lambda: (out / "ckpt.pt").exists(), "a checkpoint")
    first.kill()
    step = assert_complete_checkpoint(out / "ckpt.pt")["step"]
    live, dead = out / f".ckpt.pt.tmp{os.getpid()}", out / f".ckpt.pt.tmp{first.proc.pid}"
    live.write_bytes(b"a live process's checkpoint in flight")
    dead.write_bytes(b"a killed process's")
    result = run("train.py", *tiny(images, out, "--max-steps", step + 2), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert assert_complete_checkpoint(out / "ckpt.pt")["step"] == step + 2
    assert temp_files(out) == [live.name]


# ------------------------------------------------------------------------------------------------------------
# A new run where a run is


def test_a_new_run_into_a_finished_one_is_refused(images, finished, tmp_path):
    """The line names the checkpoint and its step, --resume, another --out-dir and --overwrite; every file
    is left as it was."""
    out = copy_run(finished, tmp_path)
    before = contents(out)
    result = run("train.py", *tiny(images, out, *SHORT))
    assert_one_line_error(result, str(out / "ckpt.pt"), "step 4", "--resume", "--out-dir", "--overwrite")
    assert contents(out) == before


@pytest.mark.parametrize("script", ["classifier.py", "flow_matching.py"])
def test_every_entry_point_refuses_a_new_run_into_a_finished_one(images, tmp_path, script):
    out = tmp_path / "out"
    out.mkdir()
    name = "classifier.pt" if script == "classifier.py" else "ckpt.pt"
    checkpoint.save({"step": 7}, out / name)
    before = contents(out)
    result = run(script, *flags(script, images, out, *SHORT))
    assert_one_line_error(result, str(out / name), "step 7", "--resume", "--overwrite")
    assert contents(out) == before


def test_overwrite_starts_anew(images, finished, tmp_path):
    """--overwrite deletes the old run's checkpoints, log and grids, then runs as in an empty folder."""
    out = copy_run(finished, tmp_path)
    result = run("train.py", *tiny(images, out, "--max-steps", 2, "--ckpt-every", 1), "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(contents(out)) == ["ckpt.pt", "config.json", "log.jsonl", "samples_00000002.png"]
    assert assert_complete_checkpoint(out / "ckpt.pt")["step"] == 2
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]


def test_resume_takes_neither_overwrite_nor_the_folder_from_the_checkpoint():
    """A run started with --overwrite saves overwrite=True in its configuration; --resume must not take it
    (it would refuse itself, --resume and --overwrite together), nor the out_dir of a moved folder."""
    saved = {"out_dir": "old", "resume": False, "overwrite": True, "lr": 1.0}
    current = {"out_dir": "new", "resume": True, "overwrite": False, "lr": 2.0}
    assert checkpoint.resumed_config(saved, current, set(), ()) == {**current, "lr": 1.0}


# ------------------------------------------------------------------------------------------------------------
# A write that fails: no space left on device


def assert_failed_write_left_the_last_checkpoint(result, ckpt, step, code=2):
    """One line naming ckpt.pt, that there is no space left, and that step `step` is intact; and it is."""
    assert_one_line_error(result, f"could not write {ckpt}", "no space left on device",
                          f"{ckpt} (step {step}), is intact", "--resume", code=code)
    assert checkpoint.load(ckpt)["step"] == step
    assert temp_files(ckpt.parent) == []


FAIL_SAVE = """
import errno, os
import torch

calls, save = 0, torch.save


def failing_save(obj, f, *args, **kwargs):
    # the Nth save fails as torch's zip writer does on a full disk: a RuntimeError raised while the write's
    # OSError is handled
    global calls
    calls += 1
    if calls == int(os.environ["FAIL_SAVE"]):
        f.write(b"PK")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("%s")
    return save(obj, f, *args, **kwargs)


torch.save = failing_save
""" % ZIP_WRITER_ERROR


@pytest.mark.parametrize("script", ["train.py", "classifier.py", "flow_matching.py"])
def test_a_failed_checkpoint_write_is_one_line_and_resume_continues(images, tmp_path, script):
    """The second checkpoint's write fails (step 4): the line says no space left and that step 2's checkpoint
    is intact; it loads, and (train.py) --resume finishes the run from it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAIL_SAVE)
    out = tmp_path / "out"
    env = dict(ENV, PYTHONPATH=str(site), FAIL_SAVE="2")
    result = run(script, *flags(script, images, out, *SHORT), env=env)
    ckpt = out / ("classifier.pt" if script == "classifier.py" else "ckpt.pt")
    assert_failed_write_left_the_last_checkpoint(result, ckpt, 2)
    if script == "train.py":
        resumed = run(script, *flags(script, images, out, *SHORT), "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert assert_complete_checkpoint(ckpt)["step"] == 4


@pytest.fixture
def small_disk(tmp_path):
    """-> (a tmpfs folder, resize(bytes)); unmounted afterwards. Skips where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")

    def resize(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    yield mount_point, resize
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_is_one_line_and_resume_continues(images, finished, small_disk):
    """A disk with room for one checkpoint, not for the next beside it (written before the old one is
    replaced): the run stops at step 4 with one line; step 2's checkpoint loads, and with room again --resume
    finishes the run."""
    disk, resize = small_disk
    size = os.path.getsize(finished / "ckpt.pt")
    resize(size * 3 // 2)
    out = disk / "out"
    result = run("train.py", *tiny(images, out, *SHORT))
    assert_failed_write_left_the_last_checkpoint(result, out / "ckpt.pt", 2)
    resize(size * 3)
    resumed = run("train.py", *tiny(images, out, *SHORT), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert assert_complete_checkpoint(out / "ckpt.pt")["step"] == 4


def test_save_names_the_cause_of_a_zip_writer_failure(tmp_path, monkeypatch):
    """checkpoint.save, in-process: torch's zip writer failing is a WriteError that names the file and the
    OSError it failed on, else (no OSError kept, the disk not full) says so; the old file stays, the temporary
    one goes."""
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1}, path)
    before = path.read_bytes()

    def failing_save(obj, f, **kwargs):
        f.write(b"PK")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError(ZIP_WRITER_ERROR)

    monkeypatch.setattr(torch, "save", failing_save)
    no_space = re.escape(f"could not write {path}: No space left on device")
    with pytest.raises(runtime.WriteError, match=no_space):
        checkpoint.save({"step": 2}, path)

    def failing_without_cause(obj, f, **kwargs):
        raise RuntimeError(ZIP_WRITER_ERROR)

    monkeypatch.setattr(torch, "save", failing_without_cause)
    with pytest.raises(runtime.WriteError, match="zip writer failed .*unexpected pos"):
        checkpoint.save({"step": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_the_log_and_the_grids_name_the_file_that_cannot_be_written(tmp_path):
    """A log and a grid whose file is /dev/full, where every write fails with ENOSPC."""
    log_path, grid_path = tmp_path / "log.jsonl", tmp_path / "samples_00000001.png"
    for path in (log_path, grid_path):
        path.symlink_to("/dev/full")
    no_space = "could not write {}: No space left on device"
    log = runtime.TrainingLog(str(log_path), 1, 0, 8, main_process=True)
    with pytest.raises(runtime.WriteError, match=re.escape(no_space.format(log_path))):
        log(dict(step=1, loss=0.5))
    with pytest.raises(runtime.WriteError, match=re.escape(no_space.format(log_path))):
        log.close()  # the line still waits in the buffer
    images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    with pytest.raises(runtime.WriteError, match=re.escape(no_space.format(grid_path))):
        sample.write_grid(images, str(grid_path), nrow=2)


# ------------------------------------------------------------------------------------------------------------
# A corrupt checkpoint


def test_a_truncated_checkpoint_names_the_newest_complete_copy(images, finished, tmp_path):
    """ckpt.pt cut in half in place, and with it ckpt-00000004.pt, the same file under a second name: the line
    names ckpt-00000003.pt, the newest copy that loads. --resume does not take it unasked: nothing changes."""
    out = copy_run(finished, tmp_path)
    whole = (out / "ckpt.pt").read_bytes()
    with open(out / "ckpt.pt", "r+b") as f:
        f.truncate(len(whole) // 2)
    before = contents(out)
    result = run("train.py", *tiny(images, out, *SHORT), "--resume")
    assert_one_line_error(result, f"{out / 'ckpt.pt'} is corrupt or truncated",
                          f"newest complete copy is {out / 'ckpt-00000003.pt'} (step 3)", "copy it")
    assert contents(out) == before
