"""Shared fixtures: the authors' reference vectors (tests/data/afm_reference.pt), a CIFAR-10-format archive of
synthetic images, one intra-op thread."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# `pytest` run from anywhere still imports the flat modules at the repository root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = Path(__file__).resolve().parent / "data"

import data  # noqa: E402
import model  # noqa: E402
from synthetic import make_images, write_cifar_archive  # noqa: E402

# Fixture case name -> the class its state dict belongs to (tests/data/README.md).
CASE_CLASS = {
    "gen_1nfe": "Generator", "gen_multi": "Generator", "gen_any": "Generator",
    "gen_deep2": "Generator", "gen_deep4": "Generator",
    "dis": "Discriminator", "dis_t": "Discriminator", "classifier": "Classifier",
}


@pytest.fixture(scope="session")
def afm_ref():
    return torch.load(DATA / "afm_reference.pt", weights_only=True, map_location="cpu")


@pytest.fixture(scope="session")
def dit_config(afm_ref):
    """The fixture's DiT kwargs without the authors' two extra keys (no CFG dropout, no learned sigma)."""
    cfg = dict(afm_ref["config"])
    assert cfg.pop("class_dropout_prob") == 0.0
    assert cfg.pop("learn_sigma") is False
    return cfg


@pytest.fixture(scope="session")
def load_case(afm_ref, dit_config):
    """name -> the right class built from config + the case's kwargs, with its state dict loaded
    strict=True."""

    def build(name):
        case = afm_ref["cases"][name]
        net = getattr(model, CASE_CLASS[name])(**case["kwargs"], **dit_config)
        net.load_state_dict(case["state_dict"], strict=True)
        return net.eval()

    return build


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A CIFAR-10 python archive of 80 synthetic disc images (tests/synthetic.py), and its MD5."""
    root = tmp_path_factory.mktemp("cifar")
    images, labels = make_images(per_class=8)
    return root, write_cifar_archive(root / "cifar-10-python.tar.gz", images, labels)


@pytest.fixture
def cifar(cifar_dir, monkeypatch):
    """The archive's folder, with the loader set to accept its MD5."""
    root, md5 = cifar_dir
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    return str(root)


@pytest.fixture(scope="module")
def one_thread():
    """The core tests run tiny models: one intra-op thread is faster than two, and much faster on a busy
    machine (OpenMP workers spin). Restored afterwards, so other test modules keep their setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
