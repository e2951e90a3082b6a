"""Tests for fid.py: the Inception against pytorch-fid / torch-fidelity vectors, the TF1 resize,
the Frechet distance, streamed statistics, image sources, the weight download and the command
line. Runs offline on CPU."""

import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402

REFERENCE = torch.load(ROOT / "tests" / "data" / "fid_reference.pt", weights_only=True)


def seeded_state_dict():
    """The fixture weights, rebuilt as tests/data/README.md describes: one RandomState draw per
    key, in file order."""
    rng = np.random.RandomState(REFERENCE["seed"])
    state_dict = {}
    for key, shape in REFERENCE["keys_shapes"]:
        shape = tuple(shape)
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.zeros(shape, dtype=torch.long)
            continue
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = rng.randn(*shape) * 0.1
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        else:
            value = rng.randn(*shape) * np.sqrt(1 / np.prod(shape[1:]))
        state_dict[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return state_dict


@pytest.fixture(scope="module")
def state_dict():
    return seeded_state_dict()


@pytest.fixture(scope="module")
def model(state_dict):
    """One network with the fixture weights; tests pick the pipeline by setting model.resize."""
    model = fid.InceptionV3()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def nchw(images_nhwc):
    return images_nhwc.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------------------
# The network

def test_state_dict_matches_weight_file_layout(model):
    ours = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    theirs = [(key, tuple(shape)) for key, shape in REFERENCE["keys_shapes"]]
    assert ours == theirs  # same keys, same shapes, same order


@pytest.mark.parametrize("resize,size", [("tf1", 32), ("tf1", 299), ("pytorch", 32), ("pytorch", 299)])
def test_features_match_reference(model, resize, size):
    expected = REFERENCE[f"feat_{resize}"][size]
    model.resize = resize
    with torch.inference_mode():
        features = model(nchw(REFERENCE["images"][size]))
    assert features.shape == (len(expected), 2048) and features.dtype == torch.float32
    relative = ((features - expected).norm() / expected.norm()).item()
    assert relative < 1e-6, relative  # measured: 0 for tf1 (bit-exact), about 1.2e-7 for pytorch
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


def test_float_input_in_0_255_equals_uint8(model):
    images = nchw(REFERENCE["images"][32][:1])
    model.resize = "tf1"
    with torch.inference_mode():
        assert torch.equal(model(images), model(images.float()))


def test_bad_resize_name_is_rejected():
    with pytest.raises(ValueError, match="resize"):
        fid.InceptionV3(resize="bicubic")


# ------------------------------------------------------------------------------------------------------------
# The TF1 resize

def test_tf1_resize_hand_example():
    # Width 2 -> 4: source coordinates 0, 0.5, 1, 1.5 (no half-pixel offset); index 2 clamps to
    # the last pixel.
    x = torch.tensor([[0.0, 10.0], [20.0, 40.0]]).view(1, 1, 2, 2)
    expected = torch.tensor([[0.0, 5.0, 10.0, 10.0],
                             [10.0, 17.5, 25.0, 25.0],
                             [20.0, 30.0, 40.0, 40.0],
                             [20.0, 30.0, 40.0, 40.0]])
    assert torch.equal(fid.resize_bilinear_tf1(x, 4)[0, 0], expected)
    # torch's half-pixel bilinear is a different function: first row 0, 2.5, 7.5, 10.
    torch_row = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)[0, 0, 0]
    assert torch.allclose(torch_row, torch.tensor([0.0, 2.5, 7.5, 10.0]))


def tf1_resize_matrix(n_in, n_out):
    """(n_out, n_in) interpolation weights of TF1's resize, one output pixel at a time in float64."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        coord = i * n_in / n_out
        lo = int(np.floor(coord))
        hi = min(lo + 1, n_in - 1)
        weights[i, lo] += 1 - (coord - lo)
        weights[i, hi] += coord - lo
    return weights


@pytest.mark.parametrize("height,width,size", [(32, 32, 299), (7, 5, 11), (13, 17, 4), (299, 299, 299)])
def test_tf1_resize_matches_loop_derivation(height, width, size):
    image = np.random.RandomState(0).uniform(0, 255, (2, 3, height, width))
    expected = tf1_resize_matrix(height, size) @ image @ tf1_resize_matrix(width, size).T
    ours = fid.resize_bilinear_tf1(torch.from_numpy(image).float(), size).double().numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-3)


# ------------------------------------------------------------------------------------------------------------
# The Frechet distance

@pytest.mark.parametrize("case", range(len(REFERENCE["frechet_cases"])))
def test_frechet_matches_pytorch_fid(case):
    c = REFERENCE["frechet_cases"][case]
    value = fid.frechet_distance(c["mu1"].numpy(), c["s1"].numpy(), c["mu2"].numpy(), c["s2"].numpy())
    assert isinstance(value, float)
    assert abs(value - c["fid"]) < 1e-9 * abs(c["fid"])
    # torch tensors are accepted as they are
    assert fid.frechet_distance(c["mu1"], c["s1"], c["mu2"], c["s2"]) == pytest.approx(c["fid"], rel=1e-9)


def random_rotation(rng, dim):
    q, r = np.linalg.qr(rng.randn(dim, dim))
    return q * np.sign(np.diag(r))


def test_frechet_closed_form_commuting_covariances():
    # sigma_i = Q diag(d_i) Q^T share eigenvectors, so tr sqrt(sigma1 sigma2) = sum sqrt(d1 d2).
    rng = np.random.RandomState(1)
    dim = 32
    q = random_rotation(rng, dim)
    d1, d2 = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    mu1, mu2 = rng.randn(dim), rng.randn(dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    value = fid.frechet_distance(mu1, (q * d1) @ q.T, mu2, (q * d2) @ q.T)
    assert value == pytest.approx(expected, rel=1e-9)


def test_frechet_shifted_means_equal_covariances():
    rng = np.random.RandomState(2)
    a = rng.randn(40, 24)
    sigma = a.T @ a / 40  # full rank, not diagonal
    mu1, mu2 = rng.randn(24), rng.randn(24)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_frechet_of_a_set_with_itself_is_zero():
    features = np.random.RandomState(3).randn(20, 64) * 2 + 1  # fewer samples than dims: singular covariance
    mu, sigma = features.mean(axis=0), np.cov(features, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(fid.FidError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------------------------------------
# Streamed statistics and image sources

def test_streamed_statistics_equal_numpy():
    rng = np.random.RandomState(4)
    features = rng.randn(1000, 16) * rng.uniform(0.1, 3, 16) + 50  # a large mean stresses the running sums
    stats = fid.FeatureStatistics(dim=16)
    for chunk in np.split(features, [7, 8, 300, 640]):  # uneven batches, one of size 1
        stats.update(torch.from_numpy(chunk))
    mu, sigma = stats.mean_and_covariance()
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False, ddof=1), rtol=1e-9, atol=1e-9)


def fake_model(images):
    """Stands in for the Inception where only the data path matters: (N, 3, 32, 32) uint8 -> (N, 2048)."""
    return images.float().flatten(1)[:, :fid.FEATURE_DIM]


def test_npz_is_streamed_in_batches(tmp_path):
    images = np.random.RandomState(5).randint(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    for name in ("plain.npz", "compressed.npz"):
        batches = list(fid.iterate_npz(tmp_path / name, batch_size=3))
        assert [len(b) for b in batches] == [3, 3, 1]
        assert np.array_equal(np.concatenate(batches), images)


def test_npz_with_wrong_image_layout_fails_before_the_network_loads(tmp_path):
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))

    def get_model():
        raise AssertionError("the network should not be needed")

    with pytest.raises(fid.FidError, match=r"arr_0 must be uint8 \(N, H, W, 3\)"):
        fid.source_statistics(str(tmp_path / "nchw.npz"), get_model, 8, "cpu")


def test_folder_and_npz_give_the_same_statistics(tmp_path, capsys):
    images = np.random.RandomState(6).randint(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", arr_0=images)
    folder = tmp_path / "folder"
    (folder / "class_b").mkdir(parents=True)
    for i, image in enumerate(images):  # recursive, sorted by path: a_0..a_2, then class_b/b_3, class_b/b_4
        Image.fromarray(image).save(folder / ("class_b" if i >= 3 else "") / f"{'ab'[i >= 3]}_{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")

    from_npz = fid.source_statistics(str(tmp_path / "set.npz"), lambda: fake_model, 2, "cpu")
    from_folder = fid.source_statistics(str(folder), lambda: fake_model, 2, "cpu")
    direct = fake_model(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    for mu, sigma in (from_npz, from_folder):
        np.testing.assert_allclose(mu, direct.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(direct, rowvar=False), rtol=1e-9, atol=1e-8)
    assert "skipping unreadable image" in capsys.readouterr().err


def test_folder_batches_split_where_the_size_changes(tmp_path):
    paths = []
    for i, size in enumerate([8, 8, 12, 8]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (size, size), color=i).save(paths[-1])  # grayscale: converted to RGB
    batches = list(fid.iterate_folder(paths, batch_size=4))
    assert [b.shape for b in batches] == [(2, 8, 8, 3), (1, 12, 12, 3), (1, 8, 8, 3)]
    assert batches[1].dtype == np.uint8 and np.all(batches[1] == 2)


def test_precomputed_statistics_are_read_back(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    loaded = fid.source_statistics(str(tmp_path / "stats.npz"), None, 8, "cpu")  # no model needed
    assert np.array_equal(loaded[0], mu) and np.array_equal(loaded[1], sigma)


# ------------------------------------------------------------------------------------------------------------
# Weights

def test_download_checks_sha256(tmp_path):
    payload = np.random.RandomState(7).bytes(3000)
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    good = tmp_path / "cache" / "good.pth"
    fid.download(source.as_uri(), good, hashlib.sha256(payload).hexdigest())
    assert good.read_bytes() == payload and not good.with_name("good.pth.part").exists()

    bad = tmp_path / "cache" / "bad.pth"
    with pytest.raises(fid.FidError, match="SHA-256"):
        fid.download(source.as_uri(), bad, "0" * 64)
    assert not bad.exists() and not bad.with_name("bad.pth.part").exists()


def test_download_resumes_a_partial_file(tmp_path):
    payload = np.random.RandomState(8).bytes(5000)
    ranges = []

    class RangeHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ranges.append(self.headers.get("Range"))
            start = int(self.headers["Range"][len("bytes="):-1]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.wfile.write(payload[start:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = tmp_path / "weights.pth"
        path.with_name("weights.pth.part").write_bytes(payload[:1234])
        fid.download(f"http://127.0.0.1:{server.server_port}/w", path, hashlib.sha256(payload).hexdigest())
    finally:
        server.shutdown()
    assert ranges == ["bytes=1234-"]
    assert path.read_bytes() == payload


def test_download_failure_says_where_to_put_the_file(tmp_path):
    target = tmp_path / "weights.pth"
    with pytest.raises(fid.FidError, match=str(target).replace("\\", "\\\\")):
        fid.download((tmp_path / "does-not-exist").as_uri(), target, "0" * 64)


def test_default_weights_path_follows_the_environment(tmp_path, monkeypatch):
    # An existing file at the default location is loaded as it is (no download); here it has the wrong keys.
    torch.save({"fc.bias": torch.zeros(1008)}, tmp_path / "inception.pth")
    monkeypatch.setenv("AFM_FID_WEIGHTS", str(tmp_path / "inception.pth"))
    assert fid.default_weights_path() == tmp_path / "inception.pth"
    with pytest.raises(fid.FidError, match="565 missing keys"):
        fid.load_inception()


def test_load_inception_checks_keys(tmp_path, state_dict):
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    with pytest.raises(fid.FidError, match="not the FID Inception"):
        fid.load_inception(wrong)
    reshaped = dict(state_dict, **{"fc.bias": torch.zeros(1000)})
    torch.save(reshaped, wrong)
    with pytest.raises(fid.FidError, match="1 wrong shapes"):
        fid.load_inception(wrong)


# ------------------------------------------------------------------------------------------------------------
# Command line

def run_cli(*args):
    return subprocess.run([sys.executable, "fid.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_npz_without_images_is_one_line_error(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    assert_one_line_error(run_cli(tmp_path / "bad.npz", tmp_path / "bad.npz"), "arr_0")


def test_cli_weights_with_wrong_keys_is_one_line_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    result = run_cli(tmp_path / "a.npz", tmp_path / "a.npz", "--weights", tmp_path / "wrong.pth")
    assert_one_line_error(result, "not the FID Inception", "missing keys")


def test_cli_stats_uses_the_model(tmp_path, model, state_dict):
    # Seeded weights passed with --weights: an explicit file is checked by keys and shapes, not by checksum.
    torch.save(state_dict, tmp_path / "seeded.pth")
    images = np.random.RandomState(9).randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=images)
    result = run_cli("--stats", tmp_path / "a_stats.npz", tmp_path / "a.npz",
                     "--weights", tmp_path / "seeded.pth", "--device", "cpu", "--batch-size", "3")
    assert result.returncode == 0, result.stderr

    model.resize = "tf1"  # the CLI's default
    mu, sigma = fid.compute_statistics(fid.iterate_array(images, 3), model, "cpu")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    with np.load(tmp_path / "a_stats.npz") as saved:
        np.testing.assert_allclose(saved["mu"], mu, rtol=1e-6)
        np.testing.assert_allclose(saved["sigma"], sigma, rtol=0, atol=1e-4 * np.abs(sigma).max())


def test_cli_fid_of_two_statistics_files(tmp_path):
    c = REFERENCE["frechet_cases"][0]
    np.savez(tmp_path / "one.npz", mu=c["mu1"].numpy(), sigma=c["s1"].numpy())
    np.savez(tmp_path / "two.npz", mu=c["mu2"].numpy(), sigma=c["s2"].numpy())
    result = run_cli(tmp_path / "one.npz", tmp_path / "two.npz", "--weights", tmp_path / "never-loaded.pth")
    assert result.returncode == 0, result.stderr
    label, value = result.stdout.split()
    assert label == "FID" and float(value) == pytest.approx(c["fid"], rel=1e-7)


def test_frechet_of_low_rank_feature_sets():
    # With n < D samples, sigma = X^T X / (n - 1) for centered X (n, D), and the nonzero eigenvalues of sigma1
    # sigma2 are the squared singular values of X1 X2^T / (n - 1): tr sqrt(sigma1 sigma2) is their sum.
    rng = np.random.RandomState(10)
    f1, f2 = rng.rand(6, 512), rng.rand(6, 512) * 1.5 + 0.1
    x1, x2 = f1 - f1.mean(axis=0), f2 - f2.mean(axis=0)
    trace_sqrt = np.linalg.svd(x1 @ x2.T / 5, compute_uv=False).sum()
    expected = (np.sum((f1.mean(axis=0) - f2.mean(axis=0)) ** 2) + np.sum(x1 ** 2) / 5 + np.sum(x2 ** 2) / 5
                - 2 * trace_sqrt)
    value = fid.frechet_distance(f1.mean(axis=0), np.cov(f1, rowvar=False),
                                 f2.mean(axis=0), np.cov(f2, rowvar=False))
    assert value == pytest.approx(expected, rel=1e-6)
