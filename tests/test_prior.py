"""prior.py: the fitted Gaussian against numpy's mean and covariance, its draws, the eigenvalue floor, the
standard prior as the exact identity; and --prior data end to end (train.py and flow_matching.py store it,
resume keeps it, and sample.py, the progress grid and the judge all draw through it)."""

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import flow_matching
import losses
import prior
import quality
import sample
import train
from synthetic import make_images

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_images(n, seed=0):
    """(n, 2, 2, 2) float images with a mean of 0.5 and correlated pixels (a random linear mix of noise)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    return (torch.randn(n, 8, generator=generator, dtype=torch.float64) @ mix).view(n, 2, 2, 2) * 0.3 + 0.5


def batches_of(images, size):
    return [(images[i:i + size], torch.zeros(len(images[i:i + size]), dtype=torch.long))
            for i in range(0, len(images), size)]


def test_standard_prior_is_the_identity():
    standard = prior.GaussianPrior()
    eps = torch.randn(3, 1, 4, 4)
    assert standard(eps) is eps and standard.standard
    assert standard.state_dict() == {}  # nothing in the checkpoint
    torch.manual_seed(5)
    drawn = standard.noise_like(eps)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.randn_like(eps))  # the same numbers a run without --prior draws
    assert prior.from_state({}).standard and prior.from_state(None).standard


def test_fit_is_numpys_mean_and_covariance():
    images = correlated_images(3000)
    fitted = prior.fit(batches_of(images, 256))
    flat = images.flatten(1).numpy()
    assert np.allclose(fitted.mean.flatten().numpy(), flat.mean(0), atol=1e-6)
    sqrt_cov = fitted.sqrt_cov().double()
    assert torch.allclose(sqrt_cov, sqrt_cov.T, atol=1e-6)  # the symmetric square root
    # every eigenvalue of this covariance is far above the floor, so Sigma^(1/2) Sigma^(1/2) is Sigma itself
    assert np.allclose((sqrt_cov @ sqrt_cov).numpy(), np.cov(flat, rowvar=False), rtol=1e-5, atol=1e-6)


def test_draws_have_the_fitted_mean_and_covariance():
    fitted = prior.fit(batches_of(correlated_images(3000), 500))
    torch.manual_seed(0)
    z = fitted.noise_like(torch.zeros(200_000, 2, 2, 2)).flatten(1).double()
    assert z.shape == (200_000, 8)
    covariance = (fitted.sqrt_cov() @ fitted.sqrt_cov()).double()
    scale = covariance.diagonal().sqrt()
    assert torch.allclose(z.mean(0), fitted.mean.flatten().double(), atol=4 * scale.max().item() / 447)
    # the sample covariance of 200,000 draws: entries within a few standard errors (about 3 sigma^2 / 447)
    assert torch.allclose(torch.cov(z.T), covariance, atol=4 * covariance.diagonal().max().item() / 447)


def numpy_sqrt_cov(images, floor=1e-4):
    """The floored symmetric square root of the images' covariance, from numpy's eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(images.flatten(1).numpy(), rowvar=False))
    eigenvalues = np.clip(eigenvalues, floor * np.clip(eigenvalues, 0, None).mean(), None)
    return eigenvectors @ np.diag(np.sqrt(eigenvalues)) @ eigenvectors.T


def test_fewer_images_than_dimensions_give_the_same_square_root():
    """With N <= D images Sigma has rank < N: the fit takes its eigenvectors from the (N, N) Gram matrix and
    keeps only those, yet Sigma^(1/2) is the full floored square root, and draws cost O(N D) per sample."""
    images = correlated_images(6)  # 6 images of 8 dimensions: rank 5
    fitted = prior.fit(batches_of(images, 6))
    assert fitted.basis.shape == (8, 5) and fitted.scales.shape == (5,)
    assert np.allclose(fitted.sqrt_cov().double().numpy(), numpy_sqrt_cov(images), atol=1e-5)


def test_fit_uses_the_first_max_samples_images():
    images = correlated_images(1000)
    fitted = prior.fit(batches_of(images, 300), max_samples=700)  # the third batch is cut after 100 images
    assert np.allclose(fitted.mean.flatten().numpy(), images[:700].flatten(1).mean(0).numpy(), atol=1e-6)


def test_floor_keeps_a_density_where_the_data_has_none():
    """A constant pixel (the black background) and a pixel that copies another: Sigma is singular, so the
    floor lifts its zero eigenvalues to 1e-4 of the mean eigenvalue and leaves the others."""
    images = correlated_images(2000)
    images[:, 0, 0, 0] = -1.0  # constant
    images[:, 1, 1, 1] = images[:, 1, 0, 0]  # a copy
    covariance = np.cov(images.flatten(1).numpy(), rowvar=False)
    true_eigenvalues = np.linalg.eigvalsh(covariance)
    floor = 1e-4 * np.clip(true_eigenvalues, 0, None).mean()
    fitted = prior.fit(batches_of(images, 500))
    eigenvalues = np.linalg.eigvalsh((fitted.sqrt_cov().double() @ fitted.sqrt_cov().double()).numpy())
    assert np.allclose(eigenvalues[:2], floor, rtol=1e-3)  # the two zero directions, floored
    assert np.allclose(eigenvalues[2:], true_eigenvalues[2:], rtol=1e-4)  # the rest untouched
    torch.manual_seed(0)
    z = fitted.noise_like(torch.zeros(10_000, 2, 2, 2))
    assert z[:, 0, 0, 0].std().item() == pytest.approx(np.sqrt(floor), rel=0.1)  # faint, but not constant


def test_training_pairs_draw_through_the_prior():
    """1-NFE make_pairs: x_s = z = mean + eps Sigma^(1/2) with the eps a plain run would draw; x_t = x."""
    fitted = prior.fit(batches_of(correlated_images(500), 500))
    x = torch.zeros(4, 2, 2, 2)
    torch.manual_seed(3)
    x_src, real, s, t, w = losses.make_pairs(x, 1, fitted)
    torch.manual_seed(3)
    losses.sample_times(4, 1, "cpu")
    eps = torch.randn_like(x)
    assert torch.allclose(x_src, fitted(eps), atol=1e-6) and torch.equal(real, x)
    assert torch.allclose(fitted(eps), fitted.mean + (eps.flatten(1) @ fitted.sqrt_cov()).view(4, 2, 2, 2))


# ------------------------------------------------------------------------------------------------------------
# End to end


FAST = ["--data", "folder", "--model", "T/4", "--image-size", "16", "--batch-size", "8", "--log-every", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """80 synthetic 16-px colour images as a class folder: 768 dimensions, so each fit takes milliseconds."""
    root = tmp_path_factory.mktemp("folder16")
    images, labels = make_images(per_class=8, size=16)
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(root / f"class{label}", exist_ok=True)
        Image.fromarray(image).save(root / f"class{label}" / f"{i}.png")
    return str(root)


def dataset_mean(folder):
    """The mean training image as the networks see it ([-1, 1]), read without prior.py or the loader."""
    dataset, *_ = data.make_dataset("folder", folder, 16)
    images = np.stack([dataset[(i, False)][0].numpy() for i in range(len(dataset))]).astype(np.float64)
    return (images / 127.5 - 1).mean(0)


def test_train_stores_the_fitted_prior_resumes_it_and_samples_through_it(folder, tmp_path):
    common = [*FAST, "--data-path", folder, "--prior", "data", "--sample-every", "4", "--ckpt-every", "2"]
    train.main([*common, "--out-dir", str(tmp_path / "a"), "--max-steps", "4"])
    train.main([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", "2"])
    train.main([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", "4", "--resume"])
    straight, resumed = (checkpoint.load(str(tmp_path / d / "ckpt.pt")) for d in "ab")
    assert np.allclose(straight["prior"]["mean"].numpy(), dataset_mean(folder), atol=1e-5)
    for key in ("mean", "basis", "scales", "floor_scale"):
        assert torch.equal(straight["prior"][key], resumed["prior"][key])
    for key, value in straight["G"].items():
        assert torch.equal(value, resumed["G"][key]), key  # resume is bitwise exact with the prior too

    # sample.py draws the run's own samples: its grid is the run's last progress grid, pixel for pixel
    out = tmp_path / "samples.png"
    sample.main(["--ckpt", str(tmp_path / "a" / "ckpt.pt"), "--out", str(out), "--device", "cpu"])
    progress_grid = Image.open(tmp_path / "a" / "samples_00000004.png")
    assert np.array_equal(np.array(Image.open(out)), np.array(progress_grid))

    # ... which differ from the same generator's samples from N(0, I)
    generator, nfe, pred, noise_prior = sample.load_generator(
        argparse.Namespace(ckpt=str(tmp_path / "a" / "ckpt.pt"), weights="ema", nfe=None, pred=None))
    labels = torch.arange(8) % 10
    from_prior = sample.sample_images(generator, lambda x: x, np.arange(8), labels, 0, nfe, pred, "cpu",
                                      noise_prior)
    from_standard = sample.sample_images(generator, lambda x: x, np.arange(8), labels, 0, nfe, pred, "cpu")
    assert not torch.equal(from_prior, from_standard)


class Identity(torch.nn.Module):
    """A one-step "generator" that returns its noise: its samples are the source distribution itself."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, y, s, t):
        return x


class Sampled(Exception):
    pass


def test_judge_draws_through_the_prior(monkeypatch):
    """SampleJudge maps its fixed standard normals through the prior: an identity generator then hands the
    judge the prior's own draws, whose mean is the fitted mean."""
    fitted = prior.fit(batches_of(correlated_images(500) * 0.1, 500))
    judged = []

    def record(judge, images, labels):
        judged.append(images)
        raise Sampled  # the judge's features are not needed here

    monkeypatch.setattr(quality, "accuracy_and_features", record)
    state = dict(real_accuracy=1.0, mu=torch.zeros(1), sigma=torch.zeros(1, 1))
    sample_judge = quality.SampleJudge(type("Judge", (), dict(num_classes=10))(), state, (2, 2, 2), 4000)
    with pytest.raises(Sampled):
        sample_judge(Identity(), prior=fitted)
    assert torch.allclose(judged[0].double().mean(0), fitted.mean.double(), atol=0.01)


def test_flow_matching_trains_and_samples_from_the_prior(folder, tmp_path):
    flow_matching.main([*FAST, "--data-path", folder, "--prior", "data", "--max-steps", "2",
                        "--sample-every", "1000", "--out-dir", str(tmp_path / "fm")])
    state = checkpoint.load(str(tmp_path / "fm" / "ckpt.pt"))
    assert np.allclose(state["prior"]["mean"].numpy(), dataset_mean(folder), atol=1e-5)
    sample.main(["--ckpt", str(tmp_path / "fm" / "ckpt.pt"), "--nfe", "2", "--out", str(tmp_path / "s.png"),
                 "--device", "cpu"])
    assert os.path.getsize(tmp_path / "s.png") > 0


@pytest.mark.parametrize("prior_flag", [["--prior", "data"], []])
def test_prior_with_guidance_is_one_error_line(folder, tmp_path, capsys, prior_flag):
    """classifier.py trains on N(0, I): guidance with the fitted prior, typed or the laptop row's, is refused
    in one line that names the flag to give."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*FAST, "--data-path", folder, *prior_flag, "--cg-scale", "0.01", "--classifier", "c.pt",
                    "--out-dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classifier guidance needs --prior standard" in err[0]


def test_a_fit_reads_each_image_once():
    """510 images in batches of 500: the loader drops the incomplete last batch, so the fit reads the first
    epoch's 500 images and stops, instead of topping up from the next epoch with images it has seen."""
    images = (np.random.RandomState(0).rand(510, 4, 4, 1) * 255).astype(np.uint8)
    dataset = data.ArrayDataset(images, np.zeros(510, dtype=np.int64))
    source = argparse.Namespace(loader=data.Loader(dataset, 10, flip=False), in_channels=1)
    fitted = prior.for_run("data", source, seed=0)
    first_epoch = data.Loader(dataset, 500, seed=0, flip=False)._epoch_keys(0)[:500]
    read = images[[index for index, _ in first_epoch]].astype(np.float64) / 127.5 - 1  # (500, 4, 4, 1)
    assert np.allclose(fitted.mean.flatten().numpy(), read.mean(0).transpose(2, 0, 1).flatten(), atol=1e-6)
