"""DRAFT"""

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from tqdm import tqdm

import losses
from gradnorm import GradientNormalization

MODES = (-1.5, -0.5, 0.5, 1.5)
MODE_STD = 0.05


def sample_data(n, generator=None):
    mode = torch.randint(len(MODES), (n, 1), generator=generator)
    return torch.tensor(MODES)[mode] + MODE_STD * torch.randn(n, 1, generator=generator)


def normal_cdf(x):
    return 0.5 * torch.special.erfc(-x / math.sqrt(2))


def mixture_cdf(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    return sum(normal_cdf((x - mu) / MODE_STD) for mu in MODES) / len(MODES)


def mixture_density(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    return sum(torch.exp(-0.5 * ((x - mu) / MODE_STD) ** 2) for mu in MODES) / (len(MODES) * MODE_STD * math.sqrt(2 * math.pi))


def optimal_map(z, iterations=64):
    z = torch.as_tensor(z, dtype=torch.float64)
    target = normal_cdf(-z.abs())
    lo = torch.zeros_like(z)
    hi = torch.full_like(z, MODES[-1] + 40 * MODE_STD)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        right = mixture_cdf(-mid) > target  # P(X > mid) = F(-mid) by symmetry
        lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
    return torch.sign(z) * hi


class Fourier(nn.Module):
    def __init__(self, dim, scale):
        super().__init__()
        if scale > 0:
            self.register_buffer("freq", torch.randn(dim // 2) * scale)
        else:
            self.register_buffer("freq", (-scale or 100) * torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2)))

    def forward(self, x):
        a = x * self.freq
        return torch.cat([x, a.sin(), a.cos()], -1)


def mlp(width, depth, fourier=0, scale=1.0, in_scale=1.0):
    layers = []
    d_in = 1
    if fourier:
        layers.append(Fourier(fourier, scale))
        d_in = fourier + 1
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), nn.SiLU()]
        d_in = width
    layers.append(nn.Linear(d_in, 1))
    if in_scale != 1.0:
        with torch.no_grad():
            layers[0].weight.mul_(in_scale)
    return nn.Sequential(*layers)


def train(steps=2000, ot_scale=0.05, ot_end=None, seed=0, batch_size=256, lr=1e-3, gp_scale=0.01, cp_scale=0.01,
          gp_eps=0.01, width=128, depth=3, d_fourier=0, d_scale=1.0, g_fourier=0, g_scale=0.0, ema_decay=0.99, g_width=None, g_in_scale=1.0, g_lr=None, progress=False, lr_decay=False, log_every=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    G = mlp(g_width or width, depth, g_fourier, g_scale, g_in_scale)
    D = mlp(width, depth, d_fourier, d_scale)
    G_ema = mlp(g_width or width, depth, g_fourier, g_scale)
    G_ema.load_state_dict(G.state_dict())
    G_ema.requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=g_lr or lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.0, 0.9))
    phi = GradientNormalization()
    ot_end = ot_scale if ot_end is None else ot_end
    for step in tqdm(range(steps), disable=not progress):
        # D step
        z = torch.randn(batch_size, 1, generator=gen)
        real = sample_data(batch_size, gen)
        with torch.no_grad():
            fake = G(z)
        n = torch.randn(2, batch_size, 1, generator=gen) * gp_eps
        logits = D(torch.cat([real, fake, real + n[0], fake + n[1]])).squeeze(1)
        lr_, lf, lrp, lfp = logits.split(batch_size)
        loss_d = (losses.relativistic_loss(lr_, lf) + gp_scale * (losses.gradient_penalty(lr_, lrp, gp_eps, 1.0)
                  + losses.gradient_penalty(lf, lfp, gp_eps, 1.0)) + cp_scale * losses.centering_penalty(lr_, lf))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # G step
        frac = step / max(steps - 1, 1)
        D.requires_grad_(False)
        z = torch.randn(batch_size, 1, generator=gen)
        real = sample_data(batch_size, gen)
        fake = G(z)
        logits = D(torch.cat([real, phi(fake)])).squeeze(1)
        lr_, lf = logits.split(batch_size)
        frac = step / max(steps - 1, 1)
        for opt in (opt_g, opt_d):
            for g in opt.param_groups:
                a = min(1.0, max(0.0, (frac - (1 - lr_decay)) / lr_decay)) if lr_decay else 0.0
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * a))
        lam = ot_end + (ot_scale - ot_end) * 0.5 * (1 + math.cos(math.pi * frac))
        loss_g = losses.relativistic_loss(lf, lr_) + lam * losses.ot_loss(fake, z, 1.0)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        with torch.no_grad():
            for pe, p in zip(G_ema.parameters(), G.parameters()):
                pe.lerp_(p, 1 - ema_decay)
        if log_every and (step + 1) % log_every == 0:
            print(step + 1, "lam=%.3f" % lam, "online rms=%.4f mono=%.4f" % evaluate(G), "ema rms=%.4f mono=%.4f" % evaluate(G_ema),
                  "d=%.3f g=%.3f" % (loss_d.item(), loss_g.item()), flush=True)
    return G_ema


def evaluate(G):
    z = torch.linspace(-3, 3, 1201, dtype=torch.float64)
    with torch.no_grad():
        x = G(z.float().unsqueeze(1)).squeeze(1).double()
    t = optimal_map(z)
    w = torch.exp(-0.5 * z**2)
    rms = ((w * (x - t) ** 2).sum() / w.sum()).sqrt().item()
    c = z.abs()[1:] < 2.5
    mono = ((x[1:] - x[:-1])[c] >= 0).double().mean().item()
    return rms, mono
