"""classifier.py: `train.py --train-classifier` end to end on small data in the real formats (a
CIFAR-10-format archive and a PNG class folder), loading the result, and whether the classifier
actually learns."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import classifier
import data
import train
from augment import AffineAugment
from model import Classifier
from synthetic import make_images, write_cifar_archive

FAST = ["--train-classifier", "--model", "T/4", "--batch-size", "8", "--num-workers", "0"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    images, labels = make_images(per_class=40, seed=0)
    return str(root), write_cifar_archive(root / "cifar-10-python.tar.gz", images, labels)


@pytest.fixture
def cifar(cifar_dir, monkeypatch):
    root, md5 = cifar_dir
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)  # the loader only accepts the archive with this MD5
    return root


def run(args):
    train.main(args)
    return checkpoint.load(os.path.join(args[args.index("--out-dir") + 1], "classifier.pt"))


def test_cli_writes_checkpoint_and_per_noise_level_log(tmp_path, monkeypatch):
    images, labels = make_images(per_class=4, seed=0)
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(tmp_path / "images" / f"class{label}", exist_ok=True)
        Image.fromarray(image).save(tmp_path / "images" / f"class{label}" / f"{i}.png")
    augmented, seen = [], []  # the augmentation's (input, output); the classifier's training inputs (x_t, t)
    affine, forward = AffineAugment(), Classifier.forward

    def augment_spy(x):
        augmented.append((x, affine(x)))
        return augmented[-1][1]

    def forward_spy(self, x, t):
        if torch.is_grad_enabled():  # a training step, not the logged EMA evaluation
            seen.append((x, t))
        return forward(self, x, t)

    monkeypatch.setattr(classifier, "AffineAugment", lambda: augment_spy)
    monkeypatch.setattr(Classifier, "forward", forward_spy)
    out = tmp_path / "out"
    state = run([*FAST, "--data", "folder", "--data-path", str(tmp_path / "images"), "--image-size", "32",
                 "--out-dir", str(out), "--max-steps", "4", "--log-every", "2", "--ckpt-every", "2"])

    assert state["step"] == 4
    assert len(augmented) == len(seen) == 4 and all(x.shape == (8, 3, 32, 32) for x, _ in augmented)
    for (_, x_aug), (x_t, t) in zip(augmented, seen):
        # x_t = (1 - t) x_aug + t z with one t ~ U(0, 1) per sample: what is left over must be
        # standard noise z
        assert t.shape == (8,) and 0 <= t.min() < t.max() <= 1
        # dividing by a tiny t would amplify rounding
        t, x_t, x_aug = t[t > 0.05], x_t[t > 0.05], x_aug[t > 0.05]
        z = (x_t - (1 - t.view(-1, 1, 1, 1)) * x_aug) / t.view(-1, 1, 1, 1)
        assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    for key in ("classifier", "online", "opt", "config", "rng", "data"):
        assert key in state, key
    assert state["classifier_kwargs"] == dict(depth=4, hidden_size=128, num_heads=4, patch_size=4,
                                              input_size=32, in_channels=3, num_classes=10)
    assert state["config"]["model"] == "T/4" and state["config"]["batch_size"] == 8  # the flags it ran with
    assert state["data"] == {"epoch": 0, "batch": 4}  # 4 of 5 batches
    assert state["opt"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert state["opt"]["param_groups"][0]["weight_decay"] == 0.0

    records = [json.loads(line) for line in open(out / "classifier_log.jsonl")]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert np.isfinite(record["loss"]) and record["loss"] > 0
        for name in ("acc", "acc_t0", "acc_t0.25", "acc_t0.5", "acc_t0.75", "acc_t1"):
            assert 0 <= record[name] <= 1, name

    net = classifier.load_classifier(str(out / "classifier.pt"))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for key, value in net.state_dict().items():
        assert torch.equal(value, state["classifier"][key]), key  # the EMA weights, which guidance uses
    assert any(not torch.equal(state["classifier"][k], state["online"][k]) for k in state["online"])
    assert net(torch.randn(3, 3, 32, 32), torch.rand(3)).shape == (3, 10)


def test_load_classifier_refuses_other_files(cifar, tmp_path):
    gan_dir = tmp_path / "gan"
    train.main(["--data", "cifar10", "--data-path", cifar, "--out-dir", str(gan_dir), "--max-steps", "1",
                "--model", "T/4", "--batch-size", "8", "--num-workers", "0"])
    with pytest.raises(checkpoint.CheckpointError, match="is a GAN checkpoint"):
        classifier.load_classifier(str(gan_dir / "ckpt.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        classifier.load_classifier(str(tmp_path / "missing.pt"))
    checkpoint.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a classifier checkpoint"):
        classifier.load_classifier(str(tmp_path / "other.pt"))
    with pytest.raises(SystemExit) as exit_info:  # --resume where only the GAN's ckpt.pt is: a one-line error
        train.main([*FAST, "--data", "cifar10", "--data-path", cifar, "--out-dir", str(gan_dir), "--resume"])
    assert exit_info.value.code == 2


def test_classifier_learns_and_noise_removes_the_signal(cifar, tmp_path):
    run([*FAST, "--data", "cifar10", "--data-path", cifar, "--out-dir", str(tmp_path), "--max-steps", "40",
         "--batch-size", "16", "--lr", "1e-3", "--log-every", "40", "--ckpt-every", "40"])
    net = classifier.load_classifier(str(tmp_path / "classifier.pt"))
    images, labels = make_images(per_class=10, seed=1)  # held out: a different seed than the training archive
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    by_level = classifier.accuracy_by_noise_level(net, x, torch.from_numpy(labels))
    acc = {k: v.item() for k, v in by_level.items()}
    # Chance is 0.1 on these 100 balanced images; a classifier guessing at random scores 0.1 +- 0.03, so 0.6
    # clean accuracy is far beyond luck (40 steps reach about 0.95 here; 30 steps already about 0.6).
    assert acc["acc_t0"] > 0.6, acc
    # At t = 1 the input is pure noise, independent of the label: any classifier is at chance
    # (0.1 +- 0.03), unless the image leaks into x_1. In between, the signal fades: t = 0.75 (noise std 3x
    # the image's scale) is harder.
    assert acc["acc_t1"] < 0.25, acc
    assert acc["acc_t0"] - acc["acc_t0.75"] > 0.2 and acc["acc_t0.75"] > acc["acc_t1"], acc


def test_resume_is_bitwise_exact(cifar, tmp_path):
    common = [*FAST, "--data", "cifar10", "--data-path", cifar, "--log-every", "2", "--ckpt-every", "2"]
    straight = run([*common, "--out-dir", str(tmp_path / "a"), "--max-steps", "4"])
    run([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", "2"])
    resumed = run([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", "4", "--resume"])
    assert resumed["step"] == straight["step"] == 4
    for net in ("classifier", "online"):
        for key, value in straight[net].items():
            assert torch.equal(value, resumed[net][key]), f"{net}.{key}"
    for index, tensors in straight["opt"]["state"].items():
        for key, value in tensors.items():
            assert torch.equal(value, resumed["opt"]["state"][index][key]), f"opt.{index}.{key}"
    assert straight["data"] == resumed["data"]
    assert torch.equal(straight["rng"][0]["torch"], resumed["rng"][0]["torch"])


def test_classifier_py_is_its_own_entry_point_without_train_py():
    """No import cycle: classifier.py imports nothing from train.py (which imports classifier.py
    for guidance)."""
    code = "import sys, classifier; assert 'train' not in sys.modules, 'classifier.py imported train.py'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True)


def test_resume_takes_a_new_learning_rate(cifar, tmp_path):
    """--resume --lr reaches the optimizer (whose state_dict carries the old rate) and the log; the model
    cannot change on resume."""
    common = [*FAST, "--data", "cifar10", "--data-path", cifar, "--out-dir", str(tmp_path),
              "--log-every", "1"]
    run([*common, "--max-steps", "2"])
    state = run([*common, "--max-steps", "3", "--lr", "1e-3", "--resume"])
    assert state["opt"]["param_groups"][0]["lr"] == state["config"]["lr"] == 1e-3
    assert json.loads(open(tmp_path / "classifier_log.jsonl").readlines()[-1])["lr"] == 1e-3
    with pytest.raises(SystemExit) as exit_info:
        classifier.main([*common[1:], "--max-steps", "4", "--model", "S/4", "--resume"])
    assert exit_info.value.code == 2
