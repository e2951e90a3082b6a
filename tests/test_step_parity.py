"""train.py's D and G updates against the authors' step (authors_step.py), on parameter GRADIENTS.

A loss can agree while its gradient does not: phi (gradnorm.py) is the identity in the forward pass, and the
paired augmentation rho drops part of D's input gradient (cutouts, shifts past the border). So each test
starts both implementations from the same weights and the same random stream, records the gradients that
reach the optimizer (after clipping, just before AdamW steps) at each of three updates, and compares them,
with the normalizer's running statistic, at 1 and 2 NFE, with the augmentation off and on.
"""

import pytest
import torch

import authors_step
import bench
import train
from augment import PairedAugment

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
# rho strong enough that a normalizer placed before it would measure a different norm: every pair shifted by
# up to 25% of the side, three cutouts each applied.
AUGMENTS = {"off": None, "on": PairedAugment(p=1.0, translate=0.25, cutouts=3)}


def recorded_gradients(optimizer):
    """Make optimizer.step() first record the gradients of its trainable parameters (zeros for an unused one);
    returns the list it appends to, one list of tensors per step."""
    seen, step = [], optimizer.step

    def recording_step(*args, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        seen.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
        return step(*args, **kwargs)

    optimizer.step = recording_step
    return seen


def twin_nets(nfe):
    """(args, ours, theirs): train.build_nets and authors_step.build_nets holding identical weights."""
    _, args = bench.parse_args(["--model", "T/4", "--image-size", "16", "--batch-size", "8", "--nfe", nfe])
    kwargs = train.network_kwargs(args, 3, 16, 10)
    ours = train.build_nets(args, *kwargs, torch.device("cpu"), distributed=False)
    theirs = authors_step.build_nets(args, *kwargs, torch.device("cpu"))
    torch.manual_seed(7)
    with torch.no_grad():  # output layers and adaLN start at zero: give them weights, so every path counts
        for p in (*ours.G.parameters(), *ours.D.parameters()):
            if p.requires_grad and not p.any():
                p.normal_(0, 0.02)
    for mine, other in ((ours.G, theirs.G), (ours.D, theirs.D), (ours.G, theirs.ema), (ours.G, ours.ema)):
        other.load_state_dict(mine.state_dict())
    return args, ours, theirs


def same_weights(ours, theirs):
    """Before each update, the authors' networks take ours: fused and unfused AdamW round differently, and the
    finite-difference R1/R2 divide D's rounding by gp_eps^2 = 1e-4, so drifted weights would blur the check.
    The normalizer's running statistic is not copied: each keeps its own over the three updates."""
    theirs.G.load_state_dict(ours.G.state_dict())
    theirs.D.load_state_dict(ours.D.state_dict())


def relative_difference(a, b):
    a, b = torch.cat([g.flatten() for g in a]), torch.cat([g.flatten() for g in b])
    return ((a - b).norm() / b.norm()).item()


def batches(step):
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 3, 16, 16, generator=generator), torch.randint(10, (8,), generator=generator)


def both_updates(nfe, augment, network):
    """Three updates of `network` ("G" or "D") by train.py and by authors_step, from the same weights and
    random stream each time. -> (our gradients, theirs, [(our normalizer statistic, theirs)]), one entry per
    update."""
    args, ours, theirs = twin_nets(nfe)
    rho = AUGMENTS[augment]
    autocast = train.set_precision("fp32", torch.device("cpu"))
    optimizer = "opt_g" if network == "G" else "opt_d"
    ours_seen = recorded_gradients(getattr(ours, optimizer))
    theirs_seen = recorded_gradients(getattr(theirs, optimizer))
    statistics = []
    for step in range(STEPS):
        x, y = batches(step)
        same_weights(ours, theirs)
        torch.manual_seed(step)
        if network == "G":
            _, finite = train.g_update(ours, args, x, y, 0.2, autocast, rho)
            torch.manual_seed(step)
            authors_step.g_update(theirs, args, x, y, 0.2, autocast, rho)
        else:
            _, finite = train.d_update(ours, args, x, y, autocast, rho)
            torch.manual_seed(step)
            authors_step.d_update(theirs, args, x, y, autocast, rho)
        assert finite
        statistics.append((ours.gradnorm.square_avg.item(), theirs.gradnorm.square_avg.item()))
    return ours_seen, theirs_seen, statistics


@pytest.mark.parametrize("augment", list(AUGMENTS))
@pytest.mark.parametrize("nfe", ["1", "2"])
@pytest.mark.parametrize("network", ["G", "D"])
def test_parameter_gradients_match_authors_step(network, nfe, augment):
    """G: the gradient through D(phi(rho(G(z)))) (eq. 34) and the normalizer's EMA. D: the same rho on each
    pair, R1/R2 on the first k augmented samples. Three updates each."""
    ours, theirs, statistics = both_updates(nfe, augment, network)
    for step in range(STEPS):
        assert relative_difference(ours[step], theirs[step]) < 1e-5, step
        assert statistics[step][0] == pytest.approx(statistics[step][1], rel=1e-5), step
    # an update moves its network: the recorded gradients are not all zero
    assert all(torch.cat([g.flatten() for g in seen]).norm() > 0 for seen in ours)
    if network == "G":
        assert statistics[-1][0] > 0  # the G update's backward went through the normalizer


def test_augmentation_changes_what_the_normalizer_measures():
    """The tests above can tell the two orders apart: with rho on, normalizing before rho gives another G
    gradient and another running statistic than the paper's order, by far more than their tolerance."""
    args, ours, _ = twin_nets("1")
    rho = AUGMENTS["on"]
    x, y = batches(0)
    results = []
    for order in ("paper", "before rho"):
        G = train.Generator(**train.network_kwargs(args, 3, 16, 10)[0])
        G.load_state_dict(ours.G.state_dict())
        gradnorm = train.GradientNormalization()
        for p in ours.d_params:
            p.requires_grad_(False)
        torch.manual_seed(0)
        fake = G(torch.randn_like(x), y, torch.ones(8), torch.zeros(8))
        real_aug, fake_aug = rho(x, fake if order == "paper" else gradnorm(fake))
        fake_in = gradnorm(fake_aug) if order == "paper" else fake_aug
        t = torch.zeros(8)
        loss = torch.nn.functional.softplus(ours.D(real_aug, y, t) - ours.D(fake_in, y, t)).mean()
        params = [p for p in G.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        results.append((grads, gradnorm.square_avg.item()))
    (paper, paper_avg), (before, before_avg) = results
    assert relative_difference(before, paper) > 1e-2
    assert abs(before_avg / paper_avg - 1) > 1e-2
