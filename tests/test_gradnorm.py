"""gradnorm.py: identity forward, normalized backward (paper eq. 23), the authors' numbers, state, and DDP."""

import datetime
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradnorm import GradientNormalization

pytestmark = pytest.mark.usefixtures("one_thread")


def backward_through(gn, w, scale=1.0):
    inp = torch.zeros(w.shape, requires_grad=True)
    (gn(inp) * w).sum().mul(scale).backward()
    return inp.grad


def test_matches_authors_sequence(afm_ref):
    """tests/data/README.md: three backward passes in sequence through one GradientNormalization()."""
    gn = GradientNormalization()
    assert len(afm_ref["gradnorm"]) == 3
    for step in afm_ref["gradnorm"]:
        inp = torch.zeros(4, 5, requires_grad=True)
        (gn(inp) * step["w"]).sum().mul(step["scale"]).backward()
        ref = step["grad"]
        assert ((inp.grad - ref).abs().max() / ref.abs().max()).item() < 1e-5
        assert math.isclose(gn.square_avg.item(), step["square_avg"].item(), rel_tol=1e-5)


def test_forward_is_identity_and_stateless():
    gn = GradientNormalization()
    x = torch.randn(3, 4, 5)
    out = gn(x)
    assert torch.equal(out, x) and out.shape == x.shape and out.dtype == x.dtype
    xr = x.clone().requires_grad_(True)
    assert torch.equal(gn(xr), x)
    assert gn.square_avg.item() == 0  # only the backward pass touches the EMA
    with torch.no_grad():
        assert torch.equal(gn(xr), x)
    assert gn.square_avg.item() == 0


def test_square_avg_is_a_buffer_that_round_trips():
    gn = GradientNormalization()
    assert list(gn.parameters()) == []
    assert "square_avg" in dict(gn.named_buffers())
    torch.manual_seed(0)
    backward_through(gn, torch.randn(4, 5))
    backward_through(gn, torch.randn(4, 5), 3.0)
    state = gn.state_dict()
    assert set(state) == {"square_avg"} and state["square_avg"].item() > 0
    fresh = GradientNormalization()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.square_avg, gn.square_avg)
    w = torch.randn(4, 5)
    assert torch.equal(backward_through(fresh, w), backward_through(gn, w))  # restored EMA, same next step
    assert torch.equal(fresh.square_avg, gn.square_avg)


@pytest.mark.parametrize("target_scale", [1.0, 2.5])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 8, 8)])
def test_first_and_second_step_scale(target_scale, shape):
    """EMA from zero, no bias correction: step 1 stores a1 = (1 - beta) ||g||^2 n, so the output gradient is
    g T / sqrt(a1), whose norm is T / sqrt((1 - beta) n) whatever the scale of g (RMS
    T / (sqrt(1 - beta) n))."""
    beta = 0.9
    n = math.prod(shape)
    torch.manual_seed(0)
    w1, w2 = torch.randn(shape), torch.randn(shape)
    norms = []
    for scale in (1e-3, 1.0, 1e3):
        gn = GradientNormalization(ema_decay=beta, target_scale=target_scale)
        g1 = backward_through(gn, w1, scale)
        a1 = (1 - beta) * (scale * w1).square().sum().item() * n
        assert math.isclose(gn.square_avg.item(), a1, rel_tol=1e-5)
        assert math.isclose(g1.norm().item(), target_scale / math.sqrt((1 - beta) * n), rel_tol=1e-5)
        assert math.isclose(g1.square().mean().sqrt().item(), target_scale / (math.sqrt(1 - beta) * n),
                            rel_tol=1e-5)
        assert torch.allclose(g1, w1 * (g1.norm() / w1.norm()), rtol=1e-5, atol=1e-9)  # direction kept
        norms.append(g1.norm().item())
        # Step 2: a2 = beta a1 + (1 - beta) ||g2||^2 n, g2 <- g2 T / sqrt(a2).
        g2 = backward_through(gn, w2, 2 * scale)
        a2 = beta * a1 + (1 - beta) * (2 * scale * w2).square().sum().item() * n
        assert math.isclose(gn.square_avg.item(), a2, rel_tol=1e-5)
        assert torch.allclose(g2, 2 * scale * w2 * target_scale / math.sqrt(a2), rtol=1e-5, atol=1e-12)
    assert max(norms) / min(norms) - 1 < 1e-5


def test_zero_gradient_is_safe():
    gn = GradientNormalization()
    g = backward_through(gn, torch.zeros(4, 5))
    assert torch.equal(g, torch.zeros(4, 5))
    assert gn.square_avg.item() == 0


# ------------------------------------------------------------------------------------------------------------
# DDP: the squared norm is averaged over ranks before the EMA


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_gradient(rank, step):
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * rank + step)) * (1 + 4 * rank)


def _ddp_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        gn = GradientNormalization()
        result = {}
        for step in range(2):
            result[f"grad{step}"] = backward_through(gn, _rank_gradient(rank, step))
            result[f"square_avg{step}"] = gn.square_avg.clone()
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed gloo")
def test_ddp_all_reduce(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    beta, n = 0.9, 12
    avg = 0.0
    for step in range(2):
        gs = [_rank_gradient(r, step) for r in range(world)]
        mean_sq = sum(g.square().sum().item() * n for g in gs) / world
        avg = beta * avg + (1 - beta) * mean_sq
        for r in range(world):
            # The same buffer on every rank, from the rank-averaged ||g||^2 n ...
            assert math.isclose(results[r][f"square_avg{step}"].item(), avg, rel_tol=1e-5)
            # ... so every rank scales its own gradient by the same number.
            assert torch.allclose(results[r][f"grad{step}"], gs[r] / math.sqrt(avg), rtol=1e-5, atol=1e-9)
    # The ranks' local norms differ a lot, so a rank-local EMA would have failed the check above.
    local = [0.1 * _rank_gradient(r, 0).square().sum().item() * n for r in range(world)]
    assert max(local) / min(local) > 4
