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


# ------------------------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkaanniemi et al. 2019)


def brute_force_precision_recall(real, fake, k):
    """The definition, point by point in numpy: a sample is realistic if it lies within some real point's
    distance to that point's k-th nearest real neighbour; recall swaps the roles."""
    def covered(points, centres):
        radii = [sorted(np.linalg.norm(centres - c, axis=1))[k] for c in centres]  # [0] is c itself
        return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, radii)) for p in points])
    return covered(fake, real), covered(real, fake)


def test_precision_and_recall_of_points_worked_out_by_hand():
    # On a line, k = 1. Real 0, 1, 2, 3, 10: radii 1, 1, 1, 1, 7 (10's nearest is 3).
    # Fake 0.5, 5, 20: radii 4.5, 4.5, 15.
    # precision: 0.5 is in 0's ball, 5 in 10's (|5 - 10| = 5 <= 7), 20 in none (|20 - 10| = 10 > 7) -> 2/3
    # recall: 0..3 are in 0.5's ball (<= 4.5 away); 10 is 5 from 5 (> 4.5) but 10 from 20 (<= 15) -> 5/5
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = torch.tensor([[0.5], [5.0], [20.0]])
    assert quality.precision_recall(real, fake, k=1) == pytest.approx((2 / 3, 1.0))
    # Fake 0.5, 1.5, 1.0: radii 0.5, 0.5, 0.5. Every sample is within 1 of a real point: precision 1.
    # recall: 0 and 2 are 0.5 from a sample, 1 is a sample; 3 and 10 are more than 0.5 from all -> 3/5
    fake = torch.tensor([[0.5], [1.5], [1.0]])
    assert quality.precision_recall(real, fake, k=1) == pytest.approx((1.0, 3 / 5))


def test_precision_and_recall_match_the_definition_on_random_points():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(0.5, 0.7, size=(45, 5))
    expected = brute_force_precision_recall(real, fake, k=3)
    assert quality.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3) == \
        pytest.approx(expected, abs=1e-12)


def test_two_samples_of_one_distribution_score_high_and_one_point_per_class_scores_no_recall():
    mixture = torch.randn(10, 8, generator=torch.Generator().manual_seed(100)) * 4  # 10 class centres, 8-d

    def draw(n, seed):
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 10
        return mixture[labels] + torch.randn(n, 8, generator=generator), labels

    real, _ = draw(1000, 0)
    other_real, labels = draw(1000, 1)
    # Not 1: a k-NN ball of a finite sample misses some of the space, the more the higher the dimension
    # (this mixture: 0.93 in 4-d, 0.86-0.87 in 8-d, 0.80 in 16-d, over three seeds)
    precision, recall = quality.precision_recall(real, other_real)
    assert precision > 0.8 and recall > 0.8
    # Mode collapse: each class drawn as one of its real points, whatever the noise. Every sample is a real
    # point, so precision is 1; each distinct sample has a ball of radius 0 (its copies are its k nearest
    # neighbours), so it covers only itself among the real points: recall 10 / 1000.
    one_per_class = real[:10][labels % 10]
    assert quality.precision_recall(real, one_per_class) == pytest.approx((1.0, 0.01))


def test_the_judge_file_holds_a_real_reference_and_the_real_against_real_ceiling(judge_file):
    path, state, _ = judge_file
    n = len(state["pr_features"])
    assert n == 50 and state["pr_features"].shape == (n, quality.FEATURE_DIM)  # half of the 100 held out
    precision, recall = state["pr_ceiling"].tolist()
    assert precision > 0.8 and recall > 0.8  # 10 squares, jittered by faint noise only


def test_sample_judge_reports_no_recall_for_a_generator_that_ignores_its_noise(judge_file):
    path, _, (test_images, test_labels) = judge_file
    judge, state = quality.load_judge(path)
    first_of_class = [int(np.flatnonzero(test_labels == k)[0]) for k in range(10)]
    images = quality.to_input(data.fit_to_size(test_images[first_of_class], 16)[..., None])
    collapsed = quality.SampleJudge(judge, state, (1, 16, 16), num_samples=100)(Painter(images))
    # 10 distinct samples, each repeated 10 times: balls of radius 0, which hold at most the 10 drawn images
    # themselves among the 50 real ones
    assert collapsed["recall"] <= 10 / 50 and collapsed["precision"] > 0.8
    assert set(collapsed) == {"accuracy", "accuracy_ratio", "fd", "fd_ratio", "precision", "recall"}
