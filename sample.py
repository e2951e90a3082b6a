"""Sampling: K generator steps from noise (t = 1) to data (t = 0)."""

import torch


@torch.no_grad()
def sample(generator, noise, labels, nfe=1, pred="x"):
    """Run the generator over the time grid linspace(1, 0, nfe + 1) (eq. 39).

    pred "x": x <- G(x, y, s, t);   pred "v": x <- x - (s - t) G(x, y, s, t).
    A 1-NFE generator ignores the times; a fixed K-step generator reads s; an any-step generator reads s and t.
    """
    times = torch.linspace(1, 0, nfe + 1, device=noise.device)
    x = noise
    for s, t in zip(times[:-1], times[1:]):
        s_batch, t_batch = s.expand(x.shape[0]), t.expand(x.shape[0])
        out = generator(x, labels, s_batch, t_batch)
        x = out if pred == "x" else x - (s - t) * out
    return x
