"""Tests for quality.py: the judge learns a labelled set, and its two numbers mean what they say."""

import numpy as np
import pytest
import torch

import checkpoint
import data
import quality


class Painter(torch.nn.Module):
    """A stand-in generator: class k is image k of a fixed set (the test set's), whatever the noise."""

    def __init__(self, images_by_class, shift=0):
        super().__init__()
        self.images = torch.nn.Parameter(images_by_class, requires_grad=False)  # (classes, C, S, S)
        self.shift = shift

    def forward(self, x, y, s=None, t=None):
        return self.images[(y + self.shift) % len(self.images)]


def squares(n, seed):
    """n 28x28 images, label i % 10: a white 6x6 square at one of 10 places (the class) on faint noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    labels = np.arange(n) % 10
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 5)
        image[2 + 12 * row:8 + 12 * row, 1 + 5 * col:7 + 5 * col] = 255
    return images, labels


@pytest.fixture(scope="module")
def judge_file(tmp_path_factory):
    """A judge trained on squares: (train, test) -> load_idx_dataset stands in for the files."""
    root = tmp_path_factory.mktemp("judge")
    splits = {True: squares(400, 0), False: squares(100, 1)}
    saved = data.load_idx_dataset
    data.load_idx_dataset = lambda name, folder, train=True, download=True: splits[train]
    try:
        state = quality.train_judge("mnist", str(root), 16, steps=150, batch_size=32,
                                    log=lambda message: None)
    finally:
        data.load_idx_dataset = saved
    path = str(root / "judge.pt")
    checkpoint.save(state, path)
    return path, state, splits[False]


def test_judge_learns_its_training_set_and_stores_real_statistics(judge_file):
    path, state, _ = judge_file
    assert state["real_accuracy"] == 1.0  # 100 held-out images, 10 positions of a square
    judge, loaded = quality.load_judge(path)
    assert loaded["kwargs"] == dict(in_channels=1, image_size=16, num_classes=10)
    assert state["mu"].shape == (quality.FEATURE_DIM,) and state["sigma"].shape == (quality.FEATURE_DIM,) * 2
    logits, features = judge(torch.zeros(3, 1, 16, 16))
    assert logits.shape == (3, 10) and features.shape == (3, quality.FEATURE_DIM)


def test_statistics_match_numpy():
    features = torch.randn(50, 6, dtype=torch.float64)
    mu, sigma = quality.statistics(features)
    assert np.allclose(mu, features.numpy().mean(0))
    assert np.allclose(sigma, np.cov(features.numpy(), rowvar=False))


def test_sample_judge_scores_right_wrong_and_untrained_generators(judge_file):
    path, _, (test_images, test_labels) = judge_file
    judge, state = quality.load_judge(path)
    first_of_class = [int(np.flatnonzero(test_labels == k)[0]) for k in range(10)]
    images = quality.to_input(data.fit_to_size(test_images[first_of_class], 16)[..., None])  # (10, 1, 16, 16)
    judged = quality.SampleJudge(judge, state, (1, 16, 16), num_samples=40)
    good = judged(Painter(images))
    assert good["accuracy"] == 1.0 and good["accuracy_ratio"] == 1.0
    # every class drawn as another: same marginal, wrong conditioning
    wrong = judged(Painter(images, shift=3))
    assert wrong["accuracy"] == 0.0
    # The Frechet distance sees only the marginal. Not bit-equal: the features are summed in another order,
    # and the covariance of 10 distinct images is singular, which the matrix square root amplifies to ~1e-5.
    assert wrong["fd"] == pytest.approx(good["fd"], rel=1e-4)
    untrained = judged(Painter(torch.zeros(10, 1, 16, 16)))  # mid-gray, what G draws at step 0
    assert untrained["fd_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert good["fd_ratio"] < 0.5 * untrained["fd_ratio"]


def test_judge_or_train_refuses_another_image_size_or_dataset(judge_file):
    path, _, _ = judge_file
    with pytest.raises(checkpoint.CheckpointError, match="judges 16-px images, not 32-px"):
        quality.judge_or_train(path, "mnist", None, 32)
    with pytest.raises(checkpoint.CheckpointError, match="judges mnist samples, not fashion-mnist"):
        quality.judge_or_train(path, "fashion-mnist", None, 16)


def test_load_judge_rejects_other_files(tmp_path):
    checkpoint.save({"G": {}}, str(tmp_path / "x.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="not a judge file"):
        quality.load_judge(str(tmp_path / "x.pt"))
