"""The paper's full recipe: flow-based classifier guidance, EMA and D reloads, and the Table-11
phase presets."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import classifier as classifier_file  # the tests' frozen classifiers take the plain name
import data
import losses
import recipe
import sample
import train
from model import Classifier, Generator
from synthetic import make_images, write_cifar_archive

TINY = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10)
FAST = ["--model", "T/4", "--batch-size", "8", "--num-workers", "0", "--log-every", "1",
        "--sample-every", "1000"]


@pytest.fixture
def cifar(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("cifar")
    images, labels = make_images(per_class=4)
    md5 = write_cifar_archive(root / "cifar-10-python.tar.gz", images, labels)
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    return str(root)


def frozen_classifier():
    torch.manual_seed(0)
    classifier = Classifier(**TINY)
    for p in classifier.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return classifier.eval().requires_grad_(False)


class RecordingClassifier(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier, self.calls = classifier, []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.classifier(x, t)


def test_guidance_gradient_reaches_g_and_not_the_classifier():
    classifier = frozen_classifier()
    G = Generator(**TINY)
    torch.nn.init.normal_(G.final_layer.linear.weight, std=0.1)  # G starts at zero output; give it a slope
    z, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    loss = losses.classifier_guidance_loss(classifier, G(z, y), y, 0.0, 0.1)
    loss.backward()
    assert G.final_layer.linear.weight.grad is not None and G.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in classifier.parameters())


def test_guidance_at_t_zero_is_plain_classifier_guidance():
    """--cg-t 0,0: the classifier sees G's output itself at t' = 0: eq. 26 reduces to eq. 24."""
    classifier = RecordingClassifier(frozen_classifier())
    fake, y = torch.randn(5, 3, 8, 8), torch.randint(0, 10, (5,))
    loss = losses.classifier_guidance_loss(classifier, fake, y, 0.0, 0.0)
    x_seen, t_seen = classifier.calls[0]
    assert torch.equal(x_seen, fake) and torch.equal(t_seen, torch.zeros(5))
    assert torch.allclose(loss, F.cross_entropy(classifier.classifier(fake, torch.zeros(5)), y))


def test_guidance_time_is_drawn_inside_the_range():
    classifier = RecordingClassifier(frozen_classifier())
    fake, y = torch.randn(4000, 3, 8, 8), torch.randint(0, 10, (4000,))
    losses.classifier_guidance_loss(classifier, fake, y, 0.2, 0.3)
    x_seen, t_seen = classifier.calls[0]
    assert t_seen.min() >= 0.2 and t_seen.max() <= 0.3
    assert t_seen.max() - t_seen.min() > 0.09  # spread over the range, not a constant
    t = t_seen.view(-1, 1, 1, 1)
    fresh_noise = (x_seen - (1 - t) * fake) / t  # x_t' = (1 - t') G(z) + t' z'  =>  z' ~ N(0, I)
    assert fresh_noise.mean().abs() < 0.01 and fresh_noise.std() == pytest.approx(1.0, abs=0.01)


def test_multistep_guidance_only_on_the_chosen_target_times(tmp_path, monkeypatch):
    classifier = frozen_classifier()
    monkeypatch.setattr(classifier_file, "load_classifier", lambda path, device: classifier)
    args = train.parse_args(["--nfe", "4", "--classifier", "c.pt", "--cg-scale", "0.02",
                             "--cg-target-times", "0"])
    guidance = recipe.make_guidance(args, torch.device("cpu"))
    fake, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    t = torch.tensor([0.0, 0.25, 0.5, 0.0])
    ce = F.cross_entropy(classifier(fake, t), y, reduction="none")
    expected = 0.02 * (ce[0] + ce[3]) / 4  # samples whose target time is 0 only, at t' = t (eq. 38)
    assert torch.allclose(guidance(fake, y, t), expected)


def test_multistep_guidance_target_times_default_to_table_11_and_are_checked():
    def args(*flags):
        return train.parse_args(["--classifier", "c.pt", "--cg-scale", "0.02", "--prior", "standard", *flags])

    assert args("--nfe", "2").cg_target_times == "0" and args("--nfe", "4").cg_target_times == "0,0.25"
    for flags, message in [(("--nfe", "3"), "needs --cg-target-times for --nfe 3"),
                           (("--nfe", "2", "--cg-target-times", "0.25"), "not a target time of a 2-step"),
                           (("--nfe", "4", "--cg-target-times", "0;0.25"), "comma-separated numbers"),
                           (("--nfe", "any", "--cg-target-times", "0"), "--nfe any draws t continuously")]:
        with pytest.raises(train.ArgumentError, match=message):
            train.validate(args(*flags), world_size=1)
    train.validate(args("--nfe", "8", "--cg-target-times", "0,0.125"), world_size=1)
    train.validate(args("--nfe", "any"), world_size=1)


def test_any_step_guidance_applies_at_every_target_time(monkeypatch):
    """--nfe any draws t ~ U(0, s): no two samples share a target time, so eq. 38 applies to every sample."""
    classifier = frozen_classifier()
    monkeypatch.setattr(classifier_file, "load_classifier", lambda path, device: classifier)
    args = train.parse_args(["--nfe", "any", "--classifier", "c.pt", "--cg-scale", "0.02"])
    guidance = recipe.make_guidance(args, torch.device("cpu"))
    fake, y, t = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)), torch.tensor([0.0, 0.13, 0.5, 0.91])
    assert torch.allclose(guidance(fake, y, t), 0.02 * F.cross_entropy(classifier(fake, t), y))


def test_phases_set_table_11_for_xl2_1nfe():
    expected = {  # Table 11, XL/2 1-NFE rows: lambda_ot, learning rate, reloads, guidance
        1: dict(ot_start=0.2, ot_end=0.005, lr=1e-4, ema_reload_every=0, d_reload_on_stall=0, cg_scale=0.0,
                augment_p=0.0),
        2: dict(ot_start=0.001, ot_end=0.001, lr=8e-5, ema_reload_every=5000, d_reload_on_stall=0,
                cg_scale=0.0),
        3: dict(ot_start=0.001, ot_end=0.001, lr=3e-5, ema_reload_every=5000, d_reload_on_stall=3,
                cg_scale=0.0),
        4: dict(ot_start=0.001, ot_end=0.001, lr=5e-5, ema_reload_every=5000, d_reload_on_stall=3,
                cg_scale=0.003, cg_t="0,0.1", augment_p=0.4),
    }
    for phase, values in expected.items():
        args = train.parse_args(["--data", "imagenet", "--model", "XL/2", "--phase", str(phase)])
        for name, value in values.items():
            assert getattr(args, name) == value, (phase, name)
        assert args.g_lr == args.lr and args.model == "XL/2" and args.batch_size == 256


def test_phases_for_multistep_and_deep_generators():
    four = train.parse_args(["--data", "imagenet", "--nfe", "4", "--phase", "4"])
    assert (four.cg_scale, four.cg_target_times, four.lr) == (0.02, "0,0.25", 3e-5)
    assert train.parse_args(["--data", "imagenet", "--nfe", "2", "--phase", "1"]).ot_start == 0.25
    deep = train.parse_args(["--data", "imagenet", "--repeat", "4", "--phase", "3"])
    assert (deep.lr, deep.g_lr) == (1e-5, 2.5e-6)  # 112-layer row: G 2.5e-6, D 1e-5
    assert train.parse_args(["--data", "imagenet", "--model", "B/2", "--phase", "1"]).ot_end == 0.01


def test_explicit_flags_override_the_phase():
    args = train.parse_args(["--data", "imagenet", "--phase", "4", "--lr", "1e-5", "--augment-p", "0"])
    assert (args.lr, args.g_lr, args.augment_p, args.cg_scale) == (1e-5, 1e-5, 0.0, 0.003)
    deep = train.parse_args(["--data", "imagenet", "--repeat", "4", "--phase", "3", "--lr", "2e-5"])
    assert (deep.lr, deep.g_lr) == (2e-5, 5e-6)  # G follows a typed --lr, divided by --repeat
    laptop = train.parse_args(["--data", "fashion-mnist", "--phase", "1"])
    assert (laptop.lr, laptop.g_lr) == (1e-4, 1e-4)  # a phase sets G's rate over the laptop row's 1e-3


def test_discriminator_augmentation_of_the_laptop_rows_and_of_phase_4():
    """Laptop rows: every pair shifted by -2..2 whole pixels at 28 or 32 px, nothing cut out. Phase 4: the
    authors' Algorithm 1 (p 0.4, shifts of 0 to 30% right and down, three cutouts)."""
    for source, size in (("fashion-mnist", 28), ("cifar10", 32)):
        augment = recipe.make_augment(train.parse_args(["--data", source]))
        assert (augment.p, augment.translate_range, augment.cutouts) == (1.0, (-0.08, 0.08), 0)
        assert augment._shift_bounds(size) == (-2, 3)  # torch.randint's (low, high): -2, ..., 2
    paper = recipe.make_augment(train.parse_args(["--data", "imagenet", "--phase", "4"]))
    assert (paper.p, paper.translate_range, paper.cutouts) == (0.4, (0.0, 0.3), 3)
    assert recipe.make_augment(train.parse_args(["--data", "imagenet"])) is None
    assert recipe.make_augment(train.parse_args(["--data", "fashion-mnist", "--augment-p", "0"])) is None


def test_ema_reload_makes_g_equal_to_the_ema(cifar, tmp_path):
    out = tmp_path / "out"
    train.main(["--data", "cifar10", "--data-path", cifar, "--out-dir", str(out), "--max-steps", "3",
                "--ema-reload-every", "3", "--ema-decay", "0.5", *FAST])
    state = checkpoint.load(out / "ckpt.pt")
    assert all(torch.equal(state["G"][k], state["ema"][k]) for k in state["G"])
    events = [json.loads(line) for line in open(out / "log.jsonl") if "event" in line]
    assert [e["step"] for e in events] == [3] and "EMA" in events[0]["event"]


def test_d_reload_on_stall_restores_the_kept_d(cifar, tmp_path, monkeypatch):
    """Scripted FIDs 5, 4, 6, 7: the best is at step 2; after two evaluations without improvement (steps 3
    and 4) D is reset to its step-2 weights, which best.pt also holds."""
    scores = iter([5.0, 4.0, 6.0, 7.0])
    monkeypatch.setattr(recipe, "in_loop_fid", lambda *args: next(scores))
    monkeypatch.setattr(recipe.fid, "load_inception", lambda *args, **kwargs: None)
    reference = tmp_path / "ref.npz"
    np.savez(reference, mu=np.zeros(3), sigma=np.eye(3))
    out = tmp_path / "out"
    train.main(["--data", "cifar10", "--data-path", cifar, "--out-dir", str(out), "--max-steps", "4",
                "--fid-every", "1", "--fid-ref", str(reference), "--d-reload-on-stall", "2", *FAST])
    best, last = checkpoint.load(out / "best.pt"), checkpoint.load(out / "ckpt.pt")
    assert best["step"] == 2 and last["step"] == 4
    assert all(torch.equal(best["D"][k], last["D"][k]) for k in best["D"])
    assert not all(torch.equal(best["G"][k], last["G"][k]) for k in best["G"])  # G went on training
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["fid"] for r in records if "fid" in r] == [5.0, 4.0, 6.0, 7.0]
    assert [r["step"] for r in records if "D reloaded" in r.get("event", "")] == [4]


def test_stall_reload_without_fid_is_refused(cifar, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", "cifar10", "--data-path", cifar, "--out-dir", str(tmp_path), "--phase", "3",
                    "--max-steps", "1", *FAST])
    assert exit_info.value.code == 2
    assert "--fid-every" in capsys.readouterr().err


def test_the_four_phases_in_sequence_end_with_a_checkpoint_sample_py_reads(cifar, tmp_path, monkeypatch):
    """Phases 1 to 4, each --init-from the previous one, on small generated data; phase 4 guides
    with a classifier trained by classifier.py. The in-loop FID (which phases 3 and 4 watch for D
    reloads) is scripted."""
    scores = iter([3.0, 2.0, 2.5, 1.0, 1.5, 1.8])
    monkeypatch.setattr(recipe, "in_loop_fid", lambda *args: next(scores))
    monkeypatch.setattr(recipe.fid, "load_inception", lambda *args, **kwargs: None)
    reference = tmp_path / "ref.npz"
    np.savez(reference, mu=np.zeros(3), sigma=np.eye(3))
    fid_flags = ["--fid-every", "1", "--fid-ref", str(reference)]
    # the GAN's flags without the sample grid
    classifier_file.main(["--data", "cifar10", "--data-path", cifar, "--out-dir", str(tmp_path / "cls"),
                          "--max-steps", "2", *FAST[:FAST.index("--sample-every")]])
    previous = None
    for phase in (1, 2, 3, 4):
        out = tmp_path / f"p{phase}"
        flags = ["--phase", str(phase), "--data", "cifar10", "--data-path", cifar, "--out-dir", str(out),
                 "--max-steps", "2", "--ema-reload-every", "2", *FAST]
        flags += ["--init-from", str(previous)] if previous else []
        flags += fid_flags if phase >= 3 else []
        flags += ["--classifier", str(tmp_path / "cls" / "classifier.pt")] if phase == 4 else []
        train.main(flags)
        state = checkpoint.load(out / "ckpt.pt")
        config = json.load(open(out / "config.json"))
        assert state["step"] == 2 and config["phase"] == phase
        if previous:  # started from the previous phase's weights, not from scratch
            assert not all(torch.equal(v, 0 * v) for k, v in state["G"].items() if "final_layer" in k)
        previous = out / "ckpt.pt"
    assert config["cg_scale"] == 0.003 and config["augment_p"] == 0.4 and config["ot_start"] == 0.001
    sample.main(["--ckpt", str(previous), "--out", str(tmp_path / "grid.png"), "--labels", "1,2"])
    assert (tmp_path / "grid.png").exists()
