"""sample.py: the authors' inference loop outputs, the time grid, and the x / v updates."""

import numpy as np
import pytest
import torch

import sample as sample_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name, case, nfe, pred", [
    ("multi_v_nfe4", "gen_multi", 4, "v"),
    ("multi_v_nfe2", "gen_multi", 2, "v"),
    ("any_v_nfe3", "gen_any", 3, "v"),
    ("multi_x_nfe2", "gen_multi", 2, "x"),
])
def test_matches_authors_sampler(name, case, nfe, pred, afm_ref, load_case):
    ref = afm_ref["sample"]
    G = load_case(case)
    noise, labels = ref["noise"], ref["labels"]
    noise_before = noise.clone()
    out = sample_mod.sample(G, noise, labels, nfe=nfe, pred=pred)
    assert torch.equal(noise, noise_before)  # not modified in place
    assert not out.requires_grad  # no graph is kept
    assert rel_err(out, ref[name]) < 2e-5


def test_one_step_is_one_generator_call(afm_ref, load_case):
    G = load_case("gen_1nfe")
    noise, labels = afm_ref["sample"]["noise"], afm_ref["sample"]["labels"]
    out = sample_mod.sample(G, noise, labels)  # defaults: nfe=1, pred="x"
    with torch.no_grad():
        direct = G(noise, labels)
    assert torch.equal(out, direct)
    assert torch.equal(sample_mod.sample(G, noise, labels, nfe=1, pred="x"), direct)


class FakeGenerator(torch.nn.Module):
    """Records (x, y, s, t) of every call; returns x + 1 + s (so each step's input depends on the
    previous one)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, y, s, t):
        self.calls.append((x.clone(), y.clone(), s.clone(), t.clone()))
        return self.weight * (x + 1 + s.view(-1, 1, 1, 1))


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("pred", ["x", "v"])
def test_time_grid_and_updates(nfe, pred):
    torch.manual_seed(0)
    noise, labels = torch.randn(5, 2, 4, 4), torch.tensor([0, 1, 2, 3, 4])
    G = FakeGenerator()
    out = sample_mod.sample(G, noise, labels, nfe=nfe, pred=pred)
    grid = np.linspace(1.0, 0.0, nfe + 1)
    assert len(G.calls) == nfe
    x = noise.clone()
    for i, (x_in, y_in, s, t) in enumerate(G.calls):
        assert s.shape == t.shape == (5,)  # one time per sample
        np.testing.assert_allclose(s.numpy(), np.full(5, grid[i]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(t.numpy(), np.full(5, grid[i + 1]), rtol=0, atol=1e-6)
        assert torch.equal(y_in, labels)
        assert torch.allclose(x_in, x, atol=1e-5)  # each step starts where the last one ended
        g = x + 1 + grid[i]
        x = g if pred == "x" else x - (grid[i] - grid[i + 1]) * g
    assert torch.allclose(out, x, atol=1e-5)
    assert not out.requires_grad
    assert G.calls[0][2][0].item() == 1.0 and (nfe > 1 or G.calls[0][3][0].item() == 0.0)


def test_constant_velocity_integrates_exactly():
    """pred v: x <- x - (s - t) v; for a constant v the steps add up to x_0 = noise - v for any NFE."""
    torch.manual_seed(0)
    noise, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for nfe in (1, 2, 5):
        labels = torch.zeros(3, dtype=torch.long)
        out = sample_mod.sample(lambda x, y, s, t: v, noise, labels, nfe=nfe, pred="v")
        assert torch.allclose(out, noise - v, atol=1e-5)
