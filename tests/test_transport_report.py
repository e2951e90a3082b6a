"""tools/transport_report.py: the Gelbrich W2 bound against closed forms and against the cost of the Gaussian
optimal map, the principal directions and their share of the variance, and the two gradients that reach G(z)
against their definitions."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import Discriminator, Generator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import transport_report  # noqa: E402


def test_w2_bound_of_a_diagonal_gaussian_is_the_closed_form():
    rng = np.random.default_rng(0)
    n, mean, scales = 6, np.array([0.5, -1.0, 0.0, 0.2, 0.0, 1.5]), np.array([0.1, 0.5, 1.0, 2.0, 0.3, 0.7])
    images = mean + scales * rng.standard_normal((200_000, n))
    # W2^2(N(0, I), N(m, diag(s^2))) = ||m||^2 + sum (s_i - 1)^2
    expected = (mean @ mean + ((scales - 1) ** 2).sum()) / n
    assert transport_report.class_gaussian(images, 1)[0] == pytest.approx(expected, rel=0.01)


def test_w2_bound_is_the_cost_of_the_gaussian_optimal_map_and_below_an_independent_pairing():
    rng = np.random.default_rng(1)
    n = 5
    A = rng.standard_normal((n, n))
    root = A @ A.T / n + 0.1 * np.eye(n)  # S^(1/2), symmetric positive definite
    mean = rng.standard_normal(n)
    z = rng.standard_normal((200_000, n))
    mapped = mean + z @ root  # T(z) = m + S^(1/2) z, the optimal map between the two Gaussians
    optimal_cost = ((mapped - z) ** 2).sum(1).mean() / n
    bound = transport_report.class_gaussian(mapped, 1)[0]
    assert bound == pytest.approx(optimal_cost, rel=0.01)
    independent = ((mapped[rng.permutation(len(z))] - z) ** 2).sum(1).mean() / n
    assert independent == pytest.approx(((mapped ** 2).sum(1).mean()) / n + 1, rel=0.01)
    assert bound < independent


def test_principal_directions_find_the_spread_axis():
    rng = np.random.default_rng(2)
    images = rng.standard_normal((5000, 4)) * np.array([0.1, 3.0, 0.1, 0.1])
    _, directions, share = transport_report.class_gaussian(images, 1)
    assert directions.shape == (4, 1) and abs(directions[1, 0]) == pytest.approx(1, abs=1e-3)
    assert share == pytest.approx(9 / (9 + 3 * 0.01), abs=0.01)


def test_gradients_are_the_ot_gradient_and_the_normalized_adversarial_one():
    torch.manual_seed(0)
    kwargs = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                  num_classes=3)
    G, D = Generator(**kwargs), Discriminator(**kwargs)
    torch.nn.init.normal_(G.final_layer.linear.weight, std=0.1)  # a G whose output depends on z
    for block in D.blocks:  # and a D whose logit depends on its input (adaLN-Zero starts at the identity)
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    z, real, y = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    fake, grad_adv, grad_ot = transport_report.gradients(G, D, z, real, y)
    assert torch.allclose(fake, G(z, y).detach().flatten(1))
    # d/dG of mean_b mean_pixels (G - z)^2 = 2 (G - z) / (B n)
    assert torch.allclose(grad_ot, 2 * (fake - z.flatten(1)) / (5 * 64), atol=1e-7)
    # gradient normalization at steady state: ||g||^2 * numel(g) = 1, with g along D's own gradient
    assert (grad_adv.square().sum() * grad_adv.numel()).item() == pytest.approx(1, rel=1e-5)
    fake_input = G(z, y).detach().requires_grad_(True)
    by_hand = torch.autograd.grad(torch.nn.functional.softplus(D(real, y) - D(fake_input, y)).mean(),
                                  fake_input)[0].flatten(1)
    cosine = torch.nn.functional.cosine_similarity(grad_adv.flatten(), by_hand.flatten(), dim=0)
    assert cosine.item() == pytest.approx(1, abs=1e-5)


def test_w2_bound_from_a_fitted_prior_is_the_cost_of_the_gaussian_optimal_map():
    """Source N(m_z, R^2), target N(m, S): the optimal map is T(z) = m + A (z - m_z) with
    A = R^-1 (R S R)^(1/2) R^-1 (symmetric positive definite), and its cost is the bound; a target equal to
    the source costs nothing."""
    rng = np.random.default_rng(3)
    n = 4

    def spd(scale):
        B = rng.standard_normal((n, n))
        return B @ B.T / n * scale + 0.2 * np.eye(n)

    def root(M):
        w, V = np.linalg.eigh(M)
        return V @ np.diag(np.sqrt(w)) @ V.T

    R, S = root(spd(1.0)), spd(2.0)
    source_mean, mean = rng.standard_normal(n), rng.standard_normal(n)
    R_inv = np.linalg.inv(R)
    A = R_inv @ root(R @ S @ R) @ R_inv
    z = source_mean + rng.standard_normal((400_000, n)) @ R
    mapped = mean + (z - source_mean) @ A
    optimal_cost = ((mapped - z) ** 2).sum(1).mean() / n
    bound = transport_report.class_gaussian(mapped, 1, source_mean, R)[0]
    assert bound == pytest.approx(optimal_cost, rel=0.01)
    assert transport_report.class_gaussian(z, 1, source_mean, R)[0] == pytest.approx(0, abs=2e-3)
