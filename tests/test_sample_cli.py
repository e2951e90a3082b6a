"""sample.py as a user runs it: grids, command-line errors, ADM-format .npz, the torchrun split, the authors'
bare generator files, and --vae.

Tiny models throughout (8x8 pixels, one block of width 32), with random non-zero weights: a real generator is
zero-initialised and would draw the same flat image for every noise and class. A few tests run `python
sample.py` (and torchrun) as subprocesses with OMP_NUM_THREADS=1; the rest call
sample.main / sample.load_generator in-process, where an uncaught exception (a traceback, to a user) fails the
test just as a wrong exit code does.
"""

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import model
import sample as sample_mod
import vae

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")

# 8x8 RGB, 10 classes: 16 tokens, ~25k parameters.
TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10)
# A latent generator's blocks for the bare-file tests (sample.py builds bare files at 32x32x4: 64
# tokens here).
TINY_ARCH = dict(depth=1, hidden_size=32, num_heads=2, patch_size=4)
# Per-parameter std of the random weights; N(0, 0.02) elsewhere. Large enough that the output depends on the
# noise and the class, and spans [-1, 1] (some pixels clip).
STD = {"x_embedder.proj.weight": 0.3, "y_embedder.embedding_table.weight": 0.5,
       "final_layer.linear.weight": 0.1}
NPZ_ARGS = ["--num-samples", "20", "--batch-size", "6", "--seed", "7", "--device", "cpu"]


def randomized(net, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":  # the fixed sin-cos positions stay
                p.copy_(torch.randn(p.shape, generator=gen) * STD.get(name, 0.02))
    return net.eval()


def write_ckpt(path, nfe=1, pred=None, seed=0):
    """A ckpt.pt in train.py's layout (checkpoint_state); G and ema hold different random weights."""
    pred = pred or ("x" if nfe == 1 else "v")
    kwargs = dict(TINY, use_t_src=nfe != 1, use_t_tgt=nfe == "any", repeat=1)
    G, ema = randomized(model.Generator(**kwargs), seed), randomized(model.Generator(**kwargs), seed + 1)
    checkpoint.save({"step": 100, "config": {"nfe": nfe, "pred": pred, "model": "T/2", "repeat": 1},
                     "generator_kwargs": kwargs, "G": G.state_dict(), "ema": ema.state_dict()}, str(path))
    return G, ema


def seeded_noise(indices, seed, shape):
    """sample.py's documented noise: sample i is drawn from a generator seeded by (seed, i)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices])


def expected_uint8(net, indices, labels, seed, nfe=1, pred="x", batch_size=None):
    """Independent of sample.to_uint8: round((x + 1) * 127.5) to nearest, clipped, NHWC, computed in the same
    batches of consecutive indices as sample.py (so the arithmetic is the same, bit for bit)."""
    indices, labels = np.asarray(indices), np.asarray(labels)
    batch_size = batch_size or len(indices)
    out = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        noise = seeded_noise(idx, seed, (net.in_channels, net.input_size, net.input_size))
        labels_batch = torch.from_numpy(labels[start:start + batch_size])
        x = sample_mod.sample(net, noise, labels_batch, nfe=nfe, pred=pred)
        pixels = np.clip(np.rint((x.double().numpy() + 1) * 127.5), 0, 255).astype(np.uint8)  # (n, C, H, W)
        out.append(pixels.transpose(0, 2, 3, 1))
    return np.concatenate(out)


def to_grid(images, nrow):
    N, H, W, C = images.shape
    rows = (N + nrow - 1) // nrow
    grid = np.zeros((rows * H, nrow * W, C), np.uint8)
    for i, image in enumerate(images):
        grid[(i // nrow) * H:(i // nrow + 1) * H, (i % nrow) * W:(i % nrow + 1) * W] = image
    return grid


def cli(*args, cwd, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else []
    return subprocess.run([sys.executable, *launcher, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_main(capsys, monkeypatch):
    """sample.main(argv) in-process -> (exit code, stdout, stderr). Exceptions other than
    SystemExit propagate."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)

    def run(*argv):
        capsys.readouterr()
        try:
            sample_mod.main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_one_error_line(code, err, *needles):
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    nets = {}
    for name, nfe in [("one", 1), ("two", 2), ("any", "any")]:
        nets[name] = write_ckpt(d / f"{name}.pt", nfe=nfe, seed={"one": 0, "two": 10, "any": 20}[name])
    return d, nets


# ------------------------------------------------------------------------------------------------------------
# 1. Grids


def test_default_grid_is_a_row_of_8_per_class_from_the_ema(ckpts, tmp_path, run_main):
    d, nets = ckpts
    G, ema = nets["one"]
    result = cli("--ckpt", d / "one.pt", "--out", "grid.png", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    image = Image.open(tmp_path / "grid.png")
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == (8 * 8, 10 * 8)  # (width, height): 8 columns, a row for each of the 10 classes
    grid = np.asarray(image)

    labels = np.repeat(np.arange(10), 8)
    from_ema = to_grid(expected_uint8(ema, np.arange(80), labels, seed=0), nrow=8)
    from_G = to_grid(expected_uint8(G, np.arange(80), labels, seed=0), nrow=8)
    assert np.abs(from_ema.astype(int) - from_G).mean() > 10  # the two weight sets draw different images
    assert np.array_equal(grid, from_ema)
    assert np.unique(grid.reshape(-1, 3), axis=0).shape[0] > 100  # not a flat image

    code, out, err = run_main("--ckpt", d / "one.pt", "--weights", "G", "--out", tmp_path / "g.png",
                              "--device", "cpu")
    assert code == 0, err
    grid_G = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid_G.shape == grid.shape
    assert np.array_equal(grid_G, from_G)
    assert not np.array_equal(grid_G, grid)


def test_labels_choose_the_images(ckpts, tmp_path, run_main):
    d, nets = ckpts
    ema = nets["one"][1]
    code, out, err = run_main("--ckpt", d / "one.pt", "--labels", "3,3,5", "--out", tmp_path / "l.png",
                              "--seed", "4", "--device", "cpu")
    assert code == 0, err
    assert "3 samples" in out
    grid = np.asarray(Image.open(tmp_path / "l.png"))
    assert grid.shape == (8, 3 * 8, 3)  # one row of 3
    expected = expected_uint8(ema, [0, 1, 2], [3, 3, 5], seed=4)
    assert np.array_equal(grid, to_grid(expected, nrow=3))
    assert not np.array_equal(grid[:, :8], grid[:, 8:16])  # same class, different noise


def test_label_out_of_range_is_one_error_line(ckpts, tmp_path, run_main):
    d, _ = ckpts
    code, out, err = run_main("--ckpt", d / "one.pt", "--labels", "12", "--out", tmp_path / "bad.png",
                              "--device", "cpu")
    line = assert_one_error_line(code, err, "12")
    assert "0..9" in line or ("0" in line and "9" in line and "range" in line), line
    assert not (tmp_path / "bad.png").exists()
    assert out == ""


def test_non_integer_labels_are_an_error_not_a_traceback(ckpts, tmp_path, run_main):
    d, _ = ckpts
    code, out, err = run_main("--ckpt", d / "one.pt", "--labels", "3,dog", "--out", tmp_path / "x.png",
                              "--device", "cpu")
    assert_one_error_line(code, err, "--labels")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------------------
# 3. Checkpoints that cannot be used


def test_step_count_must_match_a_fixed_step_checkpoint(ckpts, tmp_path, run_main):
    d, _ = ckpts
    code, out, err = run_main("--ckpt", d / "one.pt", "--nfe", "2", "--out", tmp_path / "a.png",
                              "--device", "cpu")
    line = assert_one_error_line(code, err, "--nfe 2")
    assert "1 step" in line
    code, out, err = run_main("--ckpt", d / "two.pt", "--nfe", "4", "--out", tmp_path / "b.png",
                              "--device", "cpu")
    line = assert_one_error_line(code, err, "--nfe 4")
    assert "2 step" in line
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    # The step count it was trained for works, and is the default.
    code, out, err = run_main("--ckpt", d / "two.pt", "--labels", "1", "--out", tmp_path / "c.png",
                              "--device", "cpu")
    assert code == 0, err
    ema = ckpts[1]["two"][1]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")),
                          expected_uint8(ema, [0], [1], seed=0, nfe=2, pred="v")[0])


def test_any_step_checkpoint_takes_any_positive_step_count(ckpts):
    d, _ = ckpts
    args = argparse.Namespace(ckpt=str(d / "any.pt"), weights="ema", nfe=None, pred=None, model="XL/2",
                              repeat=1)
    generator, nfe, pred, _ = sample_mod.load_generator(args)
    assert (nfe, pred) == (8, "v") and generator.use_t_src and generator.use_t_tgt
    for k in (1, 3):
        args.nfe = k
        assert sample_mod.load_generator(args)[1:3] == (k, "v")


@pytest.mark.parametrize("argv, needle", [
    (["--nfe", "0"], "--nfe"),
    (["--nfe", "-1"], "--nfe"),
    (["--npz", "s.npz", "--num-samples", "4", "--batch-size", "0"], "--batch-size"),
])
def test_non_positive_counts_are_errors(ckpts, tmp_path, run_main, argv, needle):
    d, _ = ckpts
    argv = [tmp_path / a if a.endswith(".npz") else a for a in argv]
    code, out, err = run_main("--ckpt", d / "any.pt", *argv, "--out", tmp_path / "x.png", "--device", "cpu")
    assert_one_error_line(code, err, needle)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "s.npz").exists()


def test_missing_checkpoint(tmp_path, run_main):
    code, out, err = run_main("--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "x.png", "--device", "cpu")
    assert_one_error_line(code, err, "not found", "nope.pt")
    assert not (tmp_path / "x.png").exists()


def test_truncated_checkpoint(ckpts, tmp_path, run_main):
    data = (ckpts[0] / "one.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    code, out, err = run_main("--ckpt", tmp_path / "cut.pt", "--out", tmp_path / "x.png", "--device", "cpu")
    assert_one_error_line(code, err, "corrupt or truncated", "cut.pt")
    assert not (tmp_path / "x.png").exists()


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module", params=["torch.save", "pickle"])
def payload_run(request, tmp_path_factory):
    """`python sample.py` on a ckpt whose unpickling would run code (written by torch.save, or by
    plain pickle)."""
    d = tmp_path_factory.mktemp("payload")
    marker, ckpt = d / "PWNED", d / "evil.pt"
    state = {"generator_kwargs": dict(TINY), "config": {"nfe": 1, "pred": "x"}, "ema": Payload(marker)}
    if request.param == "torch.save":
        torch.save(state, ckpt)
    else:
        with open(ckpt, "wb") as f:
            pickle.dump(state, f)
    pickle.loads(pickle.dumps(Payload(d / "SELFTEST")))  # sanity: the payload is real when unpickled plainly
    assert (d / "SELFTEST").exists()
    return d, marker, cli("--ckpt", ckpt, "--out", "x.png", "--device", "cpu", cwd=d)


def test_code_executing_pickle_is_refused_and_never_runs(payload_run):
    d, marker, result = payload_run
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: refus") and "evil.pt" in line, line
    assert not marker.exists()
    assert not (d / "x.png").exists()


def test_refusal_is_one_clean_line(payload_run):
    """Only our line on stderr: no PyTorch warning before it, no terminal escape codes inside it."""
    d, marker, result = payload_run
    assert_one_error_line(result.returncode, result.stderr, "refus")
    assert "\x1b" not in result.stderr


# ------------------------------------------------------------------------------------------------------------
# 4, 5. ADM-format .npz, one process and two


@pytest.fixture(scope="module")
def npz_one_process(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("npz1")
    result = cli("--ckpt", ckpts[0] / "one.pt", "--npz", "samples.npz", *NPZ_ARGS, cwd=out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_npz_is_adm_format_balanced_shuffled_and_rounded(ckpts, npz_one_process):
    out, result = npz_one_process
    assert sorted(os.listdir(out)) == ["samples.npz"]  # no .part / .tmp files left behind
    with np.load(out / "samples.npz") as f:
        assert sorted(f.files) == ["arr_0", "labels"]
        arr, labels = f["arr_0"], f["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (20, 8, 8, 3)  # NHWC
    assert labels.shape == (20,) and np.issubdtype(labels.dtype, np.integer)
    assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, 2))  # 2 per class
    assert not np.array_equal(labels, np.arange(20) % 10) and not np.array_equal(labels, np.sort(labels))

    # Recompute every sample independently (per-index seeded noise, batches of 6 consecutive indices).
    ema = ckpts[1]["one"][1]
    expected = expected_uint8(ema, np.arange(20), np.arange(20) % 10, seed=7, batch_size=6)
    assert len({e.tobytes() for e in expected}) == 20  # all distinct, so each row identifies its sample
    index = {e.tobytes(): i for i, e in enumerate(expected)}
    order = np.array([index.get(row.tobytes(), -1) for row in arr])
    assert (order >= 0).all(), "some rows match no independently computed sample (rounding or noise differ)"
    assert np.array_equal(np.sort(order), np.arange(20))  # a permutation of the samples
    assert not np.array_equal(order, np.arange(20))  # shuffled
    assert np.array_equal(labels, order % 10)  # each image keeps its own label
    # Rounded to nearest, not floored: flooring the same values gives different bytes.
    noise = seeded_noise(np.arange(6), 7, (3, 8, 8))
    x = sample_mod.sample(ema, noise, torch.arange(6) % 10).double().numpy()
    floored = np.clip(np.floor((x + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert not np.array_equal(floored, expected[:6])
    assert "20 samples" in result.stdout


def test_npz_is_the_same_from_two_processes(ckpts, npz_one_process, tmp_path):
    out1, _ = npz_one_process
    result = cli("--ckpt", ckpts[0] / "one.pt", "--npz", "samples.npz", *NPZ_ARGS, cwd=tmp_path,
                 torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["samples.npz"]
    with np.load(out1 / "samples.npz") as one, np.load(tmp_path / "samples.npz") as two:
        assert one["arr_0"].dtype == two["arr_0"].dtype == np.uint8
        assert np.array_equal(one["arr_0"], two["arr_0"])
        assert np.array_equal(one["labels"], two["labels"])


def test_npz_rank_with_no_batches(ckpts, tmp_path, monkeypatch):
    """Two ranks simulated in one process (barriers stubbed): with 5 samples in batches of 6, rank
    1 gets none."""
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    args = argparse.Namespace(ckpt=str(ckpts[0] / "one.pt"), weights="ema", nfe=None, pred=None, model="XL/2",
                              repeat=1, npz=str(tmp_path / "s.npz"), num_samples=5, batch_size=6, seed=3)
    generator, nfe, pred, noise_prior = sample_mod.load_generator(args)
    for rank in (1, 0):
        sample_mod.sample_npz(args, generator, lambda x: x, nfe, pred, torch.device("cpu"), rank, 2,
                              noise_prior)
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]
    with np.load(tmp_path / "s.npz") as f:
        arr, labels = f["arr_0"], f["labels"]
    expected = expected_uint8(generator, np.arange(5), np.arange(5), seed=3)
    order = [next(i for i in range(5) if np.array_equal(row, expected[i])) for row in arr]
    assert np.array_equal(labels, order) and sorted(order) == list(range(5))


# ------------------------------------------------------------------------------------------------------------
# 6. The authors' bare generator state dicts


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setitem(model.MODELS, "Tiny", dict(TINY_ARCH))
    return "Tiny"


def bare_file(path, num_classes=7, seed=0, **generator_kwargs):
    G = randomized(model.Generator(input_size=32, in_channels=4, num_classes=num_classes, **TINY_ARCH,
                                   **generator_kwargs), seed)
    torch.save(G.state_dict(), path)
    return G


def bare_args(ckpt, model_name, **kw):
    return argparse.Namespace(**{**dict(ckpt=str(ckpt), weights="ema", nfe=None, pred=None, model=model_name,
                                        repeat=1), **kw})


def same_outputs(a, b, **forward_kwargs):
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 6])
    with torch.no_grad():
        return torch.equal(a(x, y, **forward_kwargs), b(x, y, **forward_kwargs))


def test_bare_one_step_file(tmp_path, tiny_model):
    ref = bare_file(tmp_path / "g.pth")
    generator, nfe, pred, _ = sample_mod.load_generator(bare_args(tmp_path / "g.pth", tiny_model))
    assert (nfe, pred) == (1, "x")
    assert not generator.use_t_src and not generator.use_t_tgt and generator.repeat == 1
    assert generator.num_classes == 7 and generator.in_channels == 4 and generator.input_size == 32
    assert same_outputs(generator, ref)
    with pytest.raises(sample_mod.SampleError, match="1-NFE"):
        sample_mod.load_generator(bare_args(tmp_path / "g.pth", tiny_model, nfe=2))


def test_bare_multi_step_file(tmp_path, tiny_model):
    ref = bare_file(tmp_path / "g.pth", use_t_src=True)
    generator, nfe, pred, _ = sample_mod.load_generator(bare_args(tmp_path / "g.pth", tiny_model, nfe=2))
    assert (nfe, pred) == (2, "v")
    assert generator.use_t_src and not generator.use_t_tgt and generator.repeat == 1
    s = torch.full((2,), 0.5)
    assert same_outputs(generator, ref, t_src=s, t_tgt=s)
    with pytest.raises(sample_mod.SampleError, match="--nfe"):
        sample_mod.load_generator(bare_args(tmp_path / "g.pth", tiny_model))  # its step count must be given


def test_bare_any_step_file(tmp_path, tiny_model):
    ref = bare_file(tmp_path / "g.pth", use_t_src=True, use_t_tgt=True)
    generator, nfe, pred, _ = sample_mod.load_generator(bare_args(tmp_path / "g.pth", tiny_model, nfe=4))
    assert (nfe, pred) == (4, "v")
    assert generator.use_t_src and generator.use_t_tgt
    s, t = torch.full((2,), 0.75), torch.full((2,), 0.5)
    assert same_outputs(generator, ref, t_src=s, t_tgt=t)


def test_bare_any_step_file_samples_in_one_step(tmp_path, tiny_model):
    """Any step count, one included, as for our own any-step ckpt.pt; still the residual (v) form it was
    trained in."""
    bare_file(tmp_path / "g.pth", use_t_src=True, use_t_tgt=True)
    generator, nfe, pred, _ = sample_mod.load_generator(bare_args(tmp_path / "g.pth", tiny_model, nfe=1))
    assert (nfe, pred) == (1, "v")


def test_bare_deep_file(tmp_path, tiny_model):
    ref = bare_file(tmp_path / "g.pth", repeat=2)
    generator, nfe, pred, _ = sample_mod.load_generator(bare_args(tmp_path / "g.pth", tiny_model, repeat=2))
    assert (nfe, pred) == (1, "x")
    assert generator.repeat == 2 and not generator.use_t_src and not generator.use_t_tgt
    assert same_outputs(generator, ref)


def test_bare_deep_file_without_repeat_points_at_repeat(tmp_path, tiny_model):
    """A 56-layer file's keys are a multi-step file's (t_embedder): the error must mention --repeat, not only
    --nfe, or the user passes --nfe 2 and silently gets a multi-step reading of a deep generator."""
    bare_file(tmp_path / "g.pth", repeat=2)
    with pytest.raises(sample_mod.SampleError, match="--repeat"):
        sample_mod.load_generator(bare_args(tmp_path / "g.pth", tiny_model))


def test_bare_file_errors_on_the_command_line(tmp_path, tiny_model, run_main):
    bare_file(tmp_path / "g.pth")
    code, out, err = run_main("--ckpt", tmp_path / "g.pth", "--model", tiny_model,
                              "--out", tmp_path / "x.png", "--device", "cpu")
    assert_one_error_line(code, err, "--vae")
    code, out, err = run_main("--ckpt", tmp_path / "g.pth", "--model", "Nope/3", "--vae", "v.pth",
                              "--out", tmp_path / "x.png", "--device", "cpu")
    assert_one_error_line(code, err, "Nope/3", tiny_model)
    code, out, err = run_main("--ckpt", tmp_path / "g.pth", "--model", "T/2", "--vae", "v.pth",
                              "--out", tmp_path / "x.png", "--device", "cpu")
    assert_one_error_line(code, err, "does not fit")
    assert not (tmp_path / "x.png").exists()


def test_latents_are_unscaled_before_decoding(monkeypatch):
    seen = {}

    class FakeVAE:
        def decode(self, z):
            seen["z"] = z
            return z[:, :3]

    monkeypatch.setattr(vae, "load_vae", lambda path, device="cpu": FakeVAE())
    generator = model.Generator(input_size=8, in_channels=4, num_classes=3, **TINY_ARCH)
    z = torch.randn(2, 4, 8, 8)
    sample_mod.make_decoder(generator, "vae.pth", torch.device("cpu"))(z)
    assert torch.allclose(seen["z"], z / 0.18215)
    pixels_decoder = sample_mod.make_decoder(model.Generator(**TINY), None, torch.device("cpu"))
    assert pixels_decoder(z) is z  # pixels: as is


def test_vae_decodes_a_latent_grid_to_256px(tmp_path, tiny_model, run_main):
    """One real sd-vae-ft-mse-shaped decode of a 32x32x4 latent (random VAE weights, ~5-25 s on CPU)."""
    torch.manual_seed(0)
    torch.save(vae.AutoencoderKL().state_dict(), tmp_path / "vae.pth")
    bare_file(tmp_path / "g.pth")
    code, out, err = run_main("--ckpt", tmp_path / "g.pth", "--model", tiny_model,
                              "--vae", tmp_path / "vae.pth", "--labels", "2", "--out", tmp_path / "img.png",
                              "--device", "cpu")
    assert code == 0, err
    image = np.asarray(Image.open(tmp_path / "img.png"))
    assert image.shape == (256, 256, 3)
    assert image.std() > 5  # decoded structure, not a flat or empty canvas
