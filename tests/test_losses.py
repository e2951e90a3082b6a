"""losses.py: the terms (paper secs. 3.1-3.4, eqs. 1-23) and the composed D and G objectives, checked against
hand computations, autograd, and recordings of what the networks were actually called with."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import losses
import model
from gradnorm import GradientNormalization

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, in_channels=2, num_classes=3)


# ------------------------------------------------------------------------------------------------------------
# Times


def test_interpolate_endpoints_and_broadcast():
    torch.manual_seed(0)
    x, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(losses.interpolate(x, z, torch.zeros(3)), x)
    assert torch.equal(losses.interpolate(x, z, torch.ones(3)), z)
    t = torch.tensor([0.0, 0.3, 1.0])
    out = losses.interpolate(x, z, t)
    assert out.shape == x.shape
    for i in range(3):  # per sample, over every other dimension
        assert torch.allclose(out[i], (1 - t[i]) * x[i] + t[i] * z[i], atol=1e-6)
    x2, z2 = torch.randn(3, 5), torch.randn(3, 5)  # any rank
    assert torch.allclose(losses.interpolate(x2, z2, t), (1 - t)[:, None] * x2 + t[:, None] * z2, atol=1e-6)


def test_sample_times_one_step():
    s, t = losses.sample_times(7, 1, "cpu")
    assert s.shape == t.shape == (7,)
    assert torch.all(s == 1) and torch.all(t == 0)
    assert s.is_floating_point() and t.is_floating_point()
    assert torch.all(losses.time_weight(s, t) == 1)  # w = 1 for 1-NFE


def test_sample_times_k_steps():
    torch.manual_seed(0)
    s, t = losses.sample_times(4000, 4, "cpu")
    assert s.shape == t.shape == (4000,)
    assert set(s.tolist()) == {1.0, 0.75, 0.5, 0.25}  # all designated sources, and nothing else (no s = 0)
    assert torch.allclose(t, s - 0.25, atol=1e-7)
    counts = torch.stack([(s == v).sum() for v in (1.0, 0.75, 0.5, 0.25)]).float()
    assert counts.min() > 850  # uniform over the K steps (expected 1000 each)
    assert torch.allclose(losses.time_weight(s, t), torch.full_like(s, 0.25))


def test_sample_times_any_step():
    torch.manual_seed(0)
    s, t = losses.sample_times(20000, "any", "cpu")
    assert torch.all(0 <= t) and torch.all(t <= s) and torch.all(s <= 1)
    assert abs(s.mean().item() - 0.5) < 0.02  # s ~ U(0, 1)
    assert abs(t.mean().item() - 0.25) < 0.02  # t ~ U(0, s): E[t] = 1/4
    assert abs((t / s).mean().item() - 0.5) < 0.02  # t / s ~ U(0, 1)


def test_time_weight_floor():
    s = torch.tensor([1.0, 0.5, 0.3, 0.2])
    t = torch.tensor([0.0, 0.5, 0.2999, 0.6])
    w = losses.time_weight(s, t)
    assert torch.allclose(w, torch.tensor([1.0, 1e-3, 1e-3, 0.4]), atol=1e-7)


def test_predict_x_and_v():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4)
    out = torch.randn(3, 2, 4, 4)
    s, t = torch.tensor([1.0, 0.5, 0.75]), torch.tensor([0.0, 0.25, 0.25])
    G = lambda x_src, y, s_, t_: out  # noqa: E731
    assert torch.equal(losses.predict(G, x, None, s, t, "x"), out)
    v = losses.predict(G, x, None, s, t, "v")
    for i in range(3):
        assert torch.allclose(v[i], x[i] - (s[i] - t[i]) * out[i], atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# The terms


def test_relativistic_loss():
    torch.manual_seed(0)
    pos, neg = torch.randn(16) * 3, torch.randn(16) * 3
    f = losses.relativistic_loss
    assert torch.allclose(f(pos, neg), -torch.log(torch.sigmoid(pos - neg)).mean(), atol=1e-6)
    # softplus(u) - softplus(-u) = u: swapping the roles shifts the loss by the mean difference ...
    assert torch.allclose(f(pos, neg) - f(neg, pos), (neg - pos).mean(), atol=1e-5)
    # ... and per pair, sigmoid(d) + sigmoid(-d) = 1.
    for i in range(4):
        one = torch.exp(-f(pos[i:i + 1], neg[i:i + 1])) + torch.exp(-f(neg[i:i + 1], pos[i:i + 1]))
        assert torch.allclose(one, torch.tensor(1.0), atol=1e-6)
    # Paired, not all-pairs: permuting one side changes the loss.
    assert not torch.allclose(f(pos, neg), f(pos, neg.roll(1)))
    # Stable for large gaps.
    assert torch.allclose(f(torch.tensor([-100.0]), torch.tensor([0.0])), torch.tensor(100.0))
    assert f(torch.tensor([100.0]), torch.tensor([0.0])).item() < 1e-30


def test_centering_penalty():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, -0.5])
    assert torch.allclose(losses.centering_penalty(a, b), torch.tensor((1.5**2 + 1.0**2 + 0.0) / 3))


def test_gradient_penalty_multiplies_by_weight():
    logits = torch.tensor([0.1, -0.3, 2.0])
    perturbed = torch.tensor([0.12, -0.25, 1.9])
    w = torch.tensor([1.0, 0.25, 0.001])
    eps = 0.01
    hand = sum(w[i].item() * (perturbed[i].item() - logits[i].item()) ** 2 / eps**2 for i in range(3)) / 3
    assert math.isclose(losses.gradient_penalty(logits, perturbed, eps, w).item(), hand, rel_tol=1e-5)


def test_ot_loss_divides_by_weight():
    torch.manual_seed(0)
    pred, src = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    w = torch.tensor([1.0, 0.25, 0.001])
    per_sample = [((pred[i] - src[i]) ** 2).sum().item() / pred[i].numel() for i in range(3)]
    hand = sum(per_sample[i] / w[i].item() for i in range(3)) / 3
    assert math.isclose(losses.ot_loss(pred, src, w).item(), hand, rel_tol=1e-5)
    # Independent of the image size: the mean over C, H, W, not the sum.
    big = F.interpolate(pred - src, scale_factor=2, mode="nearest")
    assert math.isclose(losses.ot_loss(big, torch.zeros_like(big), w).item(), hand, rel_tol=1e-5)


def test_finite_difference_penalty_converges_to_r1():
    """E_n[(D(x + eps n) - D(x))^2 / eps^2] -> ||grad_x D(x)||^2 as eps -> 0, for n ~ N(0, I)."""
    torch.manual_seed(0)
    dim, points, draws = 3, 4, 4096
    D = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.randn(points, dim, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(D(x).sum(), x)
    r1 = grad.square().sum(1).mean().item()  # mean over points of ||grad_x D||^2
    assert r1 > 1e-3

    # Per point: antithetic pairs (+n, -n), whitened so the sample covariance is exactly I. Then the mean of
    # (g.n)^2 over the draws is exactly ||g||^2, and what is left is the finite-difference error alone.
    n = torch.randn(points, draws // 2, dim, dtype=torch.float64)
    n = torch.cat([n, -n], dim=1)
    cov = n.transpose(1, 2) @ n / n.shape[1]
    n = n @ torch.linalg.inv(torch.linalg.cholesky(cov)).transpose(1, 2)
    xs = x.detach()[:, None].expand(-1, draws, -1)
    ones = torch.ones(points * draws, dtype=torch.float64)

    def penalty(eps, noise):
        with torch.no_grad():
            base = D(xs).reshape(-1)
            moved = D(xs + eps * noise).reshape(-1)
        return losses.gradient_penalty(base, moved, eps, ones).item()

    errors = [abs(penalty(eps, n) - r1) / r1 for eps in (1e-1, 1e-2, 1e-3)]
    assert errors[1] < errors[0] / 10, errors
    assert errors[2] < errors[1] / 10, errors
    assert errors[2] < 1e-5, errors
    # Plain i.i.d. Gaussian draws (what training uses) agree too, up to Monte-Carlo error (~ sqrt(2 / draws)).
    plain = penalty(1e-3, torch.randn(points, draws, dim, dtype=torch.float64))
    assert abs(plain - r1) / r1 < 0.06


def test_classifier_guidance_loss():
    torch.manual_seed(0)
    fake = torch.randn(6, 2, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    seen = []

    def classifier(x, t):
        seen.append((x, t))
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0]], dim=1)

    loss = losses.classifier_guidance_loss(classifier, fake, y, 0.0, 0.0)  # t' = 0: plain classifier guidance
    assert torch.equal(seen[-1][0], fake)
    assert torch.allclose(loss, F.cross_entropy(classifier(fake, torch.zeros(6)), y))
    losses.classifier_guidance_loss(classifier, fake, y, 0.2, 0.4)
    x_cg, t_cg = seen[-1]
    assert t_cg.shape == (6,) and torch.all(t_cg >= 0.2) and torch.all(t_cg <= 0.4)
    assert not torch.allclose(x_cg, fake)  # re-noised


# ------------------------------------------------------------------------------------------------------------
# Gradient normalization makes G's gradient independent of the adversarial loss scale


def _g_grad(loss_scale, use_gn):
    torch.manual_seed(0)
    G = nn.Linear(4, 6)
    D = nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 1))
    z, x = torch.randn(8, 4), torch.randn(8, 6)
    gn = GradientNormalization() if use_gn else nn.Identity()
    loss = losses.relativistic_loss(D(gn(G(z))).squeeze(1), D(x).squeeze(1)) * loss_scale
    loss.backward()
    return torch.cat([p.grad.flatten() for p in G.parameters()])


def test_gradnorm_makes_generator_gradient_scale_invariant():
    g1, g1000 = _g_grad(1.0, True), _g_grad(1000.0, True)
    assert g1.abs().max() > 0
    assert ((g1000 - g1).abs().max() / g1.abs().max()).item() < 1e-5
    raw1, raw1000 = _g_grad(1.0, False), _g_grad(1000.0, False)
    assert torch.allclose(raw1000, 1000 * raw1, rtol=1e-5, atol=0)
    assert not torch.allclose(raw1, g1, rtol=1e-2)  # normalization did change the gradient


# ------------------------------------------------------------------------------------------------------------
# The composed objectives, with tiny models from model.py and recordings of their calls


class Recorder(nn.Module):
    """Runs the wrapped network and records every call's arguments and output (detached copies)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, *args):
        out = self.net(*args)
        self.calls.append(dict(args=[a.detach().clone() if torch.is_tensor(a) else a for a in args],
                               out=out.detach().clone(), grad_enabled=torch.is_grad_enabled()))
        return out


def randomize(net, seed, std=0.1):
    """Random weights everywhere (the zero-initialized layers too), so every parameter is on the
    gradient path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


SETUPS = {  # name -> nfe, pred, Generator kwargs, Discriminator kwargs
    "1nfe": (1, "x", {}, {}),
    "2step": (2, "v", dict(use_t_src=True), dict(use_t=True)),
    "anystep": ("any", "v", dict(use_t_src=True, use_t_tgt=True), dict(use_t=True)),
}


def make_nets(setup, seed=0):
    nfe, pred, g_kwargs, d_kwargs = SETUPS[setup]
    torch.manual_seed(seed)
    G = randomize(model.Generator(**g_kwargs, **TINY), seed + 1)
    D = randomize(model.Discriminator(**d_kwargs, **TINY), seed + 2)
    return nfe, pred, Recorder(G), Recorder(D)


def make_batch(B, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(B, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g)
    y = torch.randint(0, TINY["num_classes"], (B,), generator=g)
    return x, y


def reconstruct_fake(g_call, pred):
    x_src, _, s, t = g_call["args"]
    out = g_call["out"]
    return out if pred == "x" else x_src - (s - t).view(-1, 1, 1, 1) * out


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_discriminator_objective(setup, B):
    nfe, pred, G, D = make_nets(setup)
    x, y = make_batch(B)
    torch.manual_seed(1)
    loss, metrics = losses.discriminator_objective(G, D, x, y, nfe=nfe, pred=pred)
    k = max(1, round(0.25 * B))

    # G once on B samples; D exactly once on [real, fake, real[:k] + eps n1, fake[:k] + eps n2].
    assert len(G.calls) == 1 and len(D.calls) == 1
    x_src, y_g, s, t = G.calls[0]["args"]
    assert x_src.shape == x.shape and torch.equal(y_g, y)
    d_in, y_d, t_d = D.calls[0]["args"]
    assert d_in.shape == (2 * B + 2 * k, *x.shape[1:])
    assert torch.equal(y_d, torch.cat([y, y, y[:k], y[:k]]))
    assert torch.equal(t_d, torch.cat([t, t, t[:k], t[:k]]))  # D sees the target time, never the source
    real, fake, real_p, fake_p = d_in.split([B, B, k, k])
    assert torch.allclose(fake, reconstruct_fake(G.calls[0], pred), atol=1e-6)
    eps = 0.01
    for pert, base in ((real_p, real[:k]), (fake_p, fake[:k])):
        step = (pert - base) / eps
        assert step.abs().max() > 0
        assert 0.6 < step.std().item() < 1.4  # eps * N(0, I)
    assert not torch.allclose(real_p - real[:k], fake_p - fake[:k])  # two independent noises

    # Times and the real sample.
    if nfe == 1:
        assert torch.all(s == 1) and torch.all(t == 0)
        assert torch.equal(real, x)  # 1-NFE: the real sample is the data itself
        assert not torch.allclose(x_src, x)  # ... and the generator starts from noise
    else:
        if nfe != "any":
            assert torch.allclose(t, s - 1 / nfe)
        for i in range(B):
            noise = (x_src[i] - (1 - s[i]) * x[i]) / s[i]
            assert torch.allclose(x_src[i], (1 - s[i]) * x[i] + s[i] * noise)
            if t[i] > 0.05:  # x_t = (1 - t) x + t z_t with z_t independent of G's noise z_s
                z_t = (real[i] - (1 - t[i]) * x[i]) / t[i]
                z_s = (x_src[i] - (1 - s[i]) * x[i]) / s[i]
                assert 0.5 < z_t.std().item() < 1.5
                assert (z_t - z_s).abs().max() > 0.1
            elif t[i] == 0:
                assert torch.allclose(real[i], x[i], atol=1e-6)

    # The loss, recomposed from the recorded logits.
    w = torch.clamp((s - t).abs(), min=1e-3)
    lr, lf, lrp, lfp = D.calls[0]["out"].split([B, B, k, k])
    adv = F.softplus(lf - lr).mean()
    r1 = (w[:k] * (lrp - lr[:k]) ** 2).mean() / eps**2
    r2 = (w[:k] * (lfp - lf[:k]) ** 2).mean() / eps**2
    cp = ((lr + lf) ** 2).mean()
    for name, value in dict(d_adv=adv, d_r1=r1, d_r2=r2, d_cp=cp).items():
        assert torch.allclose(metrics[name], value, rtol=1e-4, atol=1e-7), name
    expected = metrics["d_adv"] + 0.25 * (metrics["d_r1"] + metrics["d_r2"]) + 0.01 * metrics["d_cp"]
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(loss, adv + 0.25 * (r1 + r2) + 0.01 * cp, rtol=1e-4)
    assert torch.allclose(metrics["d_loss"], loss)
    assert all(not v.requires_grad for v in metrics.values())
    if nfe != 1:  # the weight is not 1 here, so the check above does test the weighting
        unweighted = ((lrp - lr[:k]) ** 2).mean() / eps**2
        assert not torch.allclose(metrics["d_r1"], unweighted, rtol=1e-2)

    # No gradient flows into G; D gets gradients.
    loss.backward()
    assert all(p.grad is None for p in G.parameters())
    d_grads = [p.grad for p in D.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in d_grads)
    assert sum(g.abs().sum() > 0 for g in d_grads) == len(d_grads)


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_generator_objective(setup, B):
    nfe, pred, G, D = make_nets(setup)
    D.requires_grad_(False)
    x, y = make_batch(B)
    gn = GradientNormalization()
    torch.manual_seed(1)
    loss, metrics = losses.generator_objective(G, D, gn, x, y, nfe=nfe, pred=pred, ot_scale=0.3)

    # D twice: on real under no_grad (no backward through D for it), then on the normalized fake.
    assert len(G.calls) == 1 and len(D.calls) == 2
    assert not D.calls[0]["grad_enabled"] and D.calls[1]["grad_enabled"]
    x_src, _, s, t = G.calls[0]["args"]
    (real, y_r, t_r), (fake, y_f, t_f) = D.calls[0]["args"], D.calls[1]["args"]
    assert real.shape == fake.shape == (B, *x.shape[1:])
    assert all(torch.equal(a, b) for a, b in [(y_r, y), (y_f, y), (t_r, t), (t_f, t)])
    fake_hand = reconstruct_fake(G.calls[0], pred)
    assert torch.allclose(fake, fake_hand, atol=1e-6)
    if nfe == 1:
        assert torch.all(s == 1) and torch.all(t == 0)
        assert torch.equal(real, x)
    elif nfe != "any":
        assert torch.allclose(t, s - 1 / nfe)

    w = torch.clamp((s - t).abs(), min=1e-3)
    lr, lf = D.calls[0]["out"], D.calls[1]["out"]
    adv = F.softplus(lr - lf).mean()  # f(fake, real)
    ot = (((fake_hand - x_src) ** 2).flatten(1).mean(1) / w).mean()
    assert torch.allclose(metrics["g_adv"], adv, rtol=1e-5, atol=1e-7)
    assert torch.allclose(metrics["g_ot"], ot, rtol=1e-4, atol=1e-7)
    assert torch.allclose(loss, metrics["g_adv"] + 0.3 * metrics["g_ot"], rtol=1e-6)
    assert torch.allclose(metrics["g_loss"], loss)
    if nfe == 1:
        assert torch.allclose(metrics["g_ot"], ((fake_hand - x_src) ** 2).mean(), rtol=1e-5)  # w = 1

    loss.backward()
    assert all(p.grad is None for p in D.parameters())
    g_grads = [(n, p.grad) for n, p in G.named_parameters() if p.requires_grad]
    assert all(g is not None for _, g in g_grads)
    assert [n for n, g in g_grads if not (g.abs().sum() > 0)] == []
    assert gn.square_avg.item() > 0  # the adversarial gradient went through the normalization


class _BlockGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class BlockGradient(nn.Module):
    """Stands in for gradient normalization: identity forward, zero backward."""

    def forward(self, x):
        return _BlockGradient.apply(x)


@pytest.mark.parametrize("setup", ["1nfe", "2step"])
def test_generator_gradnorm_only_on_the_path_into_d(setup):
    """With the fake path into D cut at the normalization, G's gradient is exactly the OT term's: the OT term
    does not pass through the normalization, and nothing else reaches D from G."""
    nfe, pred, G, D = make_nets(setup)
    D.requires_grad_(False)
    x, y = make_batch(4)
    torch.manual_seed(1)
    loss, _ = losses.generator_objective(G, D, BlockGradient(), x, y, nfe=nfe, pred=pred, ot_scale=0.3)
    loss.backward()
    got = {n: p.grad.clone() for n, p in G.named_parameters() if p.requires_grad}
    G.zero_grad(set_to_none=True)

    x_src, y_g, s, t = G.calls[0]["args"]
    fake = losses.predict(G.net, x_src, y_g, s, t, pred)
    w = torch.clamp((s - t).abs(), min=1e-3)
    (0.3 * (((fake - x_src) ** 2).flatten(1).mean(1) / w).mean()).backward()
    for n, p in G.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-8), n
    assert any(p.grad.abs().sum() > 0 for p in G.parameters() if p.requires_grad)


def test_augment_goes_to_d_only():
    nfe, pred, G, D = make_nets("1nfe")
    x, y = make_batch(4)
    augment = lambda real, fake: (2 * real + 1, 2 * fake + 1)  # noqa: E731

    torch.manual_seed(1)
    losses.discriminator_objective(G, D, x, y, nfe=nfe, pred=pred, augment=augment)
    real, fake, real_p, _ = D.calls[0]["args"][0].split([4, 4, 1, 1])
    assert torch.allclose(real, 2 * x + 1)
    assert torch.allclose(fake, 2 * G.calls[0]["out"] + 1, atol=1e-6)
    assert (real_p - real[:1]).abs().max() < 0.1  # perturbation is added after augmentation

    D.requires_grad_(False)
    torch.manual_seed(1)
    _, metrics = losses.generator_objective(G, D, GradientNormalization(), x, y, nfe=nfe, pred=pred,
                                            augment=augment)
    real, fake = D.calls[1]["args"][0], D.calls[2]["args"][0]
    x_src, out = G.calls[1]["args"][0], G.calls[1]["out"]
    assert torch.allclose(real, 2 * x + 1)
    assert torch.allclose(fake, 2 * out + 1, atol=1e-6)
    assert torch.allclose(metrics["g_ot"], ((out - x_src) ** 2).mean(), rtol=1e-5)  # the un-augmented fake


def test_generator_guidance_term():
    nfe, pred, G, D = make_nets("2step")
    D.requires_grad_(False)
    x, y = make_batch(4)
    seen = []

    def guidance(fake, y_, t_):
        seen.append((fake.detach().clone(), y_, t_))
        return 0.02 * fake.square().mean()

    torch.manual_seed(1)
    loss, metrics = losses.generator_objective(G, D, GradientNormalization(), x, y, nfe=nfe, pred=pred,
                                               ot_scale=0.3, guidance=guidance)
    fake = reconstruct_fake(G.calls[0], pred)
    assert len(seen) == 1
    assert torch.allclose(seen[0][0], fake, atol=1e-6) and torch.equal(seen[0][1], y)
    assert torch.equal(seen[0][2], G.calls[0]["args"][3])  # the target time
    assert torch.allclose(metrics["g_cg"], 0.02 * fake.square().mean(), rtol=1e-5)
    assert torch.allclose(loss, metrics["g_adv"] + 0.3 * metrics["g_ot"] + metrics["g_cg"], rtol=1e-6)
