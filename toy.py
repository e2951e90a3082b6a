"""The paper's 1-D demonstration (Fig. 1, sec. 3.2): an adversarial flow model learns the W2-optimal map.

The question. A GAN generator G pushes the prior N(0, 1) onto the data distribution. Infinitely many maps do
that: any rearrangement of the prior's mass between the data modes matches the marginal just as well. Its
adversarial loss (eqs. 1-2) has no preferred map, so a GAN lands on an arbitrary one and keeps drifting
between them. AFM adds the optimal-transport (OT) term to the generator's loss (eqs. 11-14):

    L_G = f(D(phi(G(z))), D(x)) + lambda_ot * E_z[(1/n) ||G(z) - z||^2],   f(a, b) = softplus(-(a - b)),

and among all maps that match the data, the one with the least transport cost is unique (Brenier): the
W2-optimal map. phi is the gradient normalization of gradnorm.py (eq. 23). The discriminator's loss is the
usual one (eq. 13): L_D = f(D(x), D(G(z))) + lambda_gp (R1 + R2) + lambda_cp (D(x) + D(G(z)))^2, with
finite-difference R1 / R2 penalties (eqs. 3-6) and logit centering (eq. 7). This is the 1-NFE case, s = 1 and
t = 0, so the time weight w(s, t) of eqs. 18-21 is 1 and neither network needs the times.

Why 1-D. In one dimension the W2-optimal map is known in closed form: it is the unique monotone map,

    T(z) = F_data^{-1}(Phi(z)),

the z-quantile of the prior sent to the same quantile of the data (F_data the data CDF, Phi the standard
normal CDF). For the data used here, 4 narrow Gaussians at -1.5, -0.5, 0.5, 1.5, T is a staircase: each
quarter of the prior goes to one mode, in order, with jumps at z = Phi^{-1}(1/4, 2/4, 3/4) = -0.674, 0, 0.674.

What a plain GAN (--ot-scale 0) does instead. In 1-D, G is a continuous function of z, and a GAN tends to keep
the shape of its random initialization: turning a decreasing map into an increasing one would make mass cross
itself, which no gradient of the adversarial loss asks for. With the default --seed 1 the initial G is
decreasing: the GAN ends on the mode-reversed map (the quarter z < -0.674 goes to the mode at +1.5), while the
OT term turns AFM's map around onto T. With --seed 0 the initial G is increasing and the GAN happens to end
monotone too; other seeds can give other assignments of quarters to modes. AFM reaches the same map from every
seed (paper Fig. 1).

What it writes (--out DIR): toy_map.csv (z, G(z) of the EMA generator on a grid of [-3, 3]), toy.png (left:
the learned map against T; right: a histogram of generated samples against the data density), and a final line
`rms_to_ot_map=... monotone_fraction=... largest_fold=...` (defined in the "Measures" section below).

    python toy.py --out /tmp/toy                  # AFM, under 2 minutes on 2 CPU cores
    python toy.py --out /tmp/gan --ot-scale 0     # the plain GAN, for contrast
"""

import argparse
import math
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import losses
from gradnorm import GradientNormalization

# ------------------------------------------------------------------------------------------------------------
# Data, prior and the exact optimal map (float64 throughout)

MODES = (-1.5, -0.5, 0.5, 1.5)  # equal weights
MODE_STD = 0.05


def sample_data(n, generator):
    """n samples of the 4-Gaussian mixture, shaped (n, 1) like a batch of 1-D data."""
    mode = torch.randint(len(MODES), (n, 1), generator=generator)
    return torch.tensor(MODES)[mode] + MODE_STD * torch.randn(n, 1, generator=generator)


def normal_cdf(x):
    """Phi(x), written with erfc so that the lower tail keeps full relative precision."""
    return 0.5 * torch.special.erfc(-x / math.sqrt(2))


def mixture_cdf(x):
    """F_data(x) = mean over modes of Phi((x - mu) / sigma)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return sum(normal_cdf((x - mu) / MODE_STD) for mu in MODES) / len(MODES)


def mixture_density(x):
    """The data density p(x) = mean over modes of N(x; mu, sigma^2)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    densities = [torch.exp(-0.5 * ((x - mu) / MODE_STD) ** 2) / (MODE_STD * math.sqrt(2 * math.pi))
                 for mu in MODES]
    return sum(densities) / len(MODES)


def optimal_map(z, iterations=64):
    """The W2-optimal map T(z) = F_data^{-1}(Phi(z)), inverted by bisection, vectorized, in float64.

    The prior and the data are both symmetric about 0, so T is odd: we solve T(|z|) and restore the sign. For
    z >= 0 we match upper tails, P_data(X > x) = F_data(-x) = Phi(-|z|), where erfc is accurate even far out.
    The solution lies in [0, 1.5 + 40 sigma]; 64 halvings of that interval reach float64 resolution.
    Between modes F_data is flat to machine precision, and there T has an (almost) vertical jump: at exactly
    z = 0 the bisection returns the left end of the flat stretch, 0, which is also the symmetric answer.
    """
    z = torch.as_tensor(z, dtype=torch.float64)
    upper_tail = normal_cdf(-z.abs())
    lo = torch.zeros_like(z)
    hi = torch.full_like(z, MODES[-1] + 40 * MODE_STD)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        solution_is_right_of_mid = mixture_cdf(-mid) > upper_tail
        lo = torch.where(solution_is_right_of_mid, mid, lo)
        hi = torch.where(solution_is_right_of_mid, hi, mid)
    return torch.sign(z) * hi


# ------------------------------------------------------------------------------------------------------------
# Networks
#
# The authors used MLPs with 4 hidden layers of width 1024, every scalar input sinusoidally encoded (64 dims,
# value x 100), trained for 10,000 steps at batch 1024 and lr 1e-4 (their public notebook of Figs. 1-3). That
# is ~500x the compute of this script's 2-minute CPU budget, so both networks here have 3 hidden layers of
# width 128 and train for 5,000 steps at batch 256 and lr 1e-3. D keeps the authors' sinusoidal encoding,
# which it needs to see the narrow modes (a plain MLP on the raw scalar is smooth, and took thousands of steps
# before its loss left log 2), at value x 20: wavelengths down to 0.3 rather than 0.06, enough for 0.05-wide
# modes (x 100 did a little worse in short runs of this script). G takes z as is: a plain SiLU MLP is a smooth
# function of z, which suits a monotone staircase map (an encoded G folds all along the map, not only next to
# the jumps; see largest_fold).


class SinusoidalEncoding(nn.Module):
    """x -> [sin(scale x f_i), cos(scale x f_i)], f_i = 10000^(-i / half): the usual timestep embedding."""

    def __init__(self, dim=64, scale=20.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", scale * torch.exp(-math.log(10000) * torch.arange(half) / half))

    def forward(self, x):  # (N, 1) -> (N, dim)
        angles = x * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def mlp(in_dim, width=128, hidden_layers=3):
    """in_dim -> width -> ... -> 1, SiLU between layers."""
    layers, dim = [], in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(dim, width), nn.SiLU()]
        dim = width
    layers.append(nn.Linear(dim, 1))
    return nn.Sequential(*layers)


def make_generator():
    """G: z (N, 1) -> x (N, 1)."""
    return mlp(1)


def make_discriminator():
    """D: x (N, 1) -> logit (N, 1)."""
    encoding = SinusoidalEncoding()
    return nn.Sequential(encoding, mlp(encoding.freqs.numel() * 2))


# ------------------------------------------------------------------------------------------------------------
# Training: alternate one D step and one G step, like the image objective in losses.py


def discriminator_step(G, D, optimizer, z, real, noise, gp_scale, cp_scale, gp_eps):
    """L_D = f(D(x), D(G(z))) + lambda_gp (R1 + R2) + lambda_cp (D(x) + D(G(z)))^2  (eq. 13).

    G runs under no_grad. D runs once on [real, fake, real + eps n1, fake + eps n2]; the paper's toy applies
    the finite-difference R1 / R2 to the whole batch (the image model uses 25% of it).
    noise: (2, N, 1) ~ N(0, 1)."""
    with torch.no_grad():
        fake = G(z)
    batch = real.shape[0]
    logits = D(torch.cat([real, fake, real + gp_eps * noise[0], fake + gp_eps * noise[1]])).squeeze(1)
    logits_real, logits_fake, logits_real_perturbed, logits_fake_perturbed = logits.split(batch)
    adversarial = losses.relativistic_loss(logits_real, logits_fake)
    r1 = losses.gradient_penalty(logits_real, logits_real_perturbed, gp_eps, 1.0)
    r2 = losses.gradient_penalty(logits_fake, logits_fake_perturbed, gp_eps, 1.0)
    centering = losses.centering_penalty(logits_real, logits_fake)
    loss = adversarial + gp_scale * (r1 + r2) + cp_scale * centering
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def generator_step(G, D, gradnorm, optimizer, z, real, ot_scale):
    """L_G = f(D(phi(G(z))), D(x)) + lambda_ot ||G(z) - z||^2 / n  (eq. 14; w = 1 for 1-NFE).

    D's parameters are frozen for this step, so the backward pass only fills G's gradients; the real logits
    need none, so they come from their own call under no_grad (as in losses.generator_objective). phi
    (gradient normalization) sits on the fake path into D only: it fixes the adversarial gradient's scale, so
    that ot_scale alone sets the balance between matching the data and staying close to z."""
    D.requires_grad_(False)
    with torch.no_grad():
        logits_real = D(real).squeeze(1)
    fake = G(z)
    logits_fake = D(gradnorm(fake)).squeeze(1)
    loss = losses.relativistic_loss(logits_fake, logits_real) + ot_scale * losses.ot_loss(fake, z, 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    D.requires_grad_(True)


# Defaults tuned for the 2-minute budget (the authors' toy in brackets):
# - ot_scale 0.3 (0.05), constant. The OT term has two jobs here: pick the monotone assignment of prior
#   quarters to modes, and order the samples inside each mode. The second is a weak signal (the transport cost
#   of the best and worst orderings inside a 0.05-wide mode differ by little), which in 5,000 noisy steps
#   needs a larger weight than in the authors' 10,000 steps at batch 1024. 0.1-0.6 gave similar maps in
#   5,000-step runs; decaying it to ~0.05 within this short run left the within-mode order more scrambled (and
#   folded the map more next to the jumps of T: largest_fold 0.22 against 0.17). It must stay well below ~1.3:
#   with the adversarial gradient normalized to unit RMS, the OT gradient 2 lambda_ot (G(z) - z), RMS ~0.76
#   lambda_ot here, must not outweigh it.
# - gp_scale 0.1 (0.01). A smoother D pushes samples across the gaps between modes more evenly, so the mass
#   per mode balances sooner; at 0.01 a small D is too sharp for this step budget. cp_scale 0.01 and gp_eps
#   0.01 as in the paper.
# - lr 1e-3 (1e-4) with Adam betas (0, 0.9) as in the paper. EMA decay 0.995 (0.99): the EMA also averages out
#   the step-to-step jitter of where the map's jumps sit, which dominates rms_to_optimal_map.
STEPS, BATCH_SIZE, LR, EMA_DECAY = 5000, 256, 1e-3, 0.995
OT_SCALE, GP_SCALE, CP_SCALE, GP_EPS = 0.3, 0.1, 0.01, 0.01


def train(steps=STEPS, ot_scale=OT_SCALE, seed=1, batch_size=BATCH_SIZE, gp_scale=GP_SCALE, cp_scale=CP_SCALE,
          gp_eps=GP_EPS, lr=LR, ema_decay=EMA_DECAY, progress=False):
    """Train G and D from scratch; return the EMA of G (in eval mode, no grad). Same seed, same thread count:
    same result. ot_scale = 0 is a plain GAN."""
    torch.manual_seed(seed)  # network initialization
    rng = torch.Generator().manual_seed(seed)  # data, prior and penalty noise
    G, D = make_generator(), make_discriminator()
    G_ema = make_generator().requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    gradnorm = GradientNormalization()
    optimizer_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.9))
    optimizer_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.0, 0.9))
    for _ in tqdm(range(steps), desc="train", disable=not progress):
        z = torch.randn(batch_size, 1, generator=rng)  # (N, 1)
        real = sample_data(batch_size, rng)  # (N, 1)
        noise = torch.randn(2, batch_size, 1, generator=rng)  # (2, N, 1)
        discriminator_step(G, D, optimizer_d, z, real, noise, gp_scale, cp_scale, gp_eps)
        z, real = torch.randn(batch_size, 1, generator=rng), sample_data(batch_size, rng)
        generator_step(G, D, gradnorm, optimizer_g, z, real, ot_scale)
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - ema_decay)
    return G_ema.eval()


# ------------------------------------------------------------------------------------------------------------
# Measures, on the z grid of toy_map.csv

GRID = torch.linspace(-3, 3, 1201, dtype=torch.float64)  # spacing 0.005


@torch.no_grad()
def generate(G, z):
    """G(z) for a 1-D float64 tensor z, returned the same way."""
    return G(z.float().unsqueeze(1)).squeeze(1).double()


def prior_weights(z):
    """Normalized N(0, 1) density on the grid: sums over the grid become expectations over z ~ N(0, 1)."""
    density = torch.exp(-0.5 * z**2)
    return density / density.sum()


def rms_to_optimal_map(z, x):
    """sqrt(E_{z ~ N(0,1)} (G(z) - T(z))^2), by quadrature on the grid (|z| <= 3 holds 99.7% of the prior).

    Weighting by the prior counts each part of the map by how much of the generated mass it moves; the grid's
    tails at |z| ~ 3 matter little, as they should. Reference values: the exact map 0; a map that sends each
    prior quarter to the right mode in a random order inside it ~0.07; the identity map G(z) = z 0.38; a map
    that swaps two neighbouring modes >= 0.7 (half of the mass is off by the mode spacing 1.0); the
    mode-reversed map 2.2. T jumps by ~1 at z = -0.674, 0, 0.674, so a learned map's error is dominated by
    where its steps sit: three steps each off by dz cost ~sqrt(dz) (the prior density at the three jumps sums
    to ~1), e.g. 0.1 for dz = 0.01, which is 0.3% of the prior's mass per jump landing in the neighbouring
    mode."""
    return (prior_weights(z) * (x - optimal_map(z)) ** 2).sum().sqrt().item()


def monotone_fraction(z, x, tolerance=0.5):
    """P(G(z2) >= G(z1) - tolerance | z1 < z2) for z1, z2 ~ N(0, 1) independent, by quadrature on the grid.

    1 for any increasing map (the exact map, the identity); ~0.25 for a map that reverses the mode order;
    0.875 for one that swaps two modes. The tolerance, half the mode spacing, lets through rearrangements
    inside a mode (all within +-3 sigma = +-0.15) and the small folds a smooth G makes next to T's
    near-vertical jumps, but no pair of samples sent to modes in the wrong order. So this measures the
    monotone assignment of the prior to the modes; the within-mode detail shows in rms_to_optimal_map and in
    the figure."""
    w = prior_weights(z)
    later = z[None, :] > z[:, None]  # pairs (i, j) with z_i < z_j
    kept_order = x[None, :] >= x[:, None] - tolerance
    pair_weights = w[:, None] * w[None, :] * later
    return ((pair_weights * kept_order).sum() / pair_weights.sum()).item()


def largest_fold(z, x, z_max=2.0):
    """max over z1 < z2 of G(z1) - G(z2), for |z| <= z_max (95% of the prior's mass): 0 for a monotone map.

    The W2-optimal map is monotone, and the learned one is not quite: within ~0.1 of each jump of T it dips to
    the far side of the mode below before the jump and overshoots to the far side of the mode above after it.
    A fold smaller than a mode's extent, 6 sigma = 0.3, only reorders samples inside one mode: it moves no
    mass between modes. So 0.3 is the tolerance to which the map is monotone; the README has the
    measurements."""
    inner = x[z.abs() <= z_max]
    return (torch.cummax(inner, 0).values - inner).max().item()


# ------------------------------------------------------------------------------------------------------------
# The figure, with PIL only


class Panel:
    """A rectangle of the image with data coordinates: to_px maps (u, v) data to pixels."""

    def __init__(self, draw, box, u_range, v_range):
        self.draw, self.box, self.u_range, self.v_range = draw, box, u_range, v_range

    def to_px(self, u, v):
        left, top, right, bottom = self.box
        (u0, u1), (v0, v1) = self.u_range, self.v_range
        return left + (u - u0) / (u1 - u0) * (right - left), bottom - (v - v0) / (v1 - v0) * (bottom - top)

    def axes(self, font, u_ticks, v_ticks, u_label, v_label, title):
        left, top, right, bottom = self.box
        self.draw.rectangle(self.box, outline="black")
        for u in u_ticks:
            px, _ = self.to_px(u, 0)
            self.draw.line([(px, bottom), (px, bottom + 5)], fill="black")
            self.draw.text((px, bottom + 7), f"{u:g}", fill="black", font=font, anchor="mt")
        for v in v_ticks:
            _, py = self.to_px(0, v)
            self.draw.line([(left - 5, py), (left, py)], fill="black")
            self.draw.text((left - 7, py), f"{v:g}", fill="black", font=font, anchor="rm")
        self.draw.text(((left + right) / 2, bottom + 28), u_label, fill="black", font=font, anchor="mt")
        self.draw.text((left - 45, (top + bottom) / 2), v_label, fill="black", font=font, anchor="rm")
        self.draw.text(((left + right) / 2, top - 10), title, fill="black", font=font, anchor="mb")

    def curve(self, u, v, fill, width=2):
        self.draw.line([self.to_px(a, b) for a, b in zip(u.tolist(), v.tolist())], fill=fill, width=width)

    def legend(self, font, entries):
        left, top, _, _ = self.box
        for row, (label, fill) in enumerate(entries):
            y = top + 14 + 20 * row
            self.draw.line([(left + 12, y), (left + 36, y)], fill=fill, width=3)
            self.draw.text((left + 42, y), label, fill="black", font=font, anchor="lm")


def draw_figure(z, x, samples, title, path, size=(1100, 500)):
    """Left: G(z) against T(z). Right: histogram of G's samples against the data density."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    draw.text((size[0] / 2, 8), title, fill="black", font=font, anchor="mt")
    blue, red = (31, 119, 180), (214, 39, 40)

    left = Panel(draw, (110, 60, 520, 430), (-3, 3), (-2.2, 2.2))
    left.axes(font, [-3, -2, -1, 0, 1, 2, 3], [-2, -1, 0, 1, 2], "z ~ N(0, 1)", "x", "transport map")
    left.curve(z, optimal_map(z), blue, width=5)
    left.curve(z, x.clamp(-2.2, 2.2), red)
    left.legend(font, [("W2-optimal map T(z)", blue), ("learned G(z) (EMA)", red)])

    bins = torch.linspace(-2.2, 2.2, 221, dtype=torch.float64)  # width 0.02
    counts = torch.histogram(samples.clamp(-2.2, 2.2), bins).hist
    histogram_density = counts / (samples.numel() * (bins[1] - bins[0]))
    density = mixture_density(bins)
    v_max = 1.15 * max(density.max().item(), histogram_density.max().item())
    right = Panel(draw, (640, 60, 1070, 430), (-2.2, 2.2), (0, v_max))
    v_step = 0.5 if v_max < 4 else 1.0
    right.axes(font, [-2, -1, 0, 1, 2], np.arange(0, v_max, v_step).round(1).tolist(), "x", "density",
               "generated samples vs data")
    for lo, hi, h in zip(bins[:-1].tolist(), bins[1:].tolist(), histogram_density.tolist()):
        if h > 0:
            x0, y0 = right.to_px(lo, h)
            x1, y1 = right.to_px(hi, 0)
            draw.rectangle([x0, y0, x1, y1], fill=(250, 160, 160))
    right.curve(bins, density, blue)
    right.legend(font, [("data density", blue), ("histogram of G(z)", (250, 160, 160))])
    image.save(path)


# ------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder for toy_map.csv and toy.png")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help="training steps, each one D and one G update")
    parser.add_argument("--ot-scale", type=float, default=OT_SCALE, help="lambda_ot; 0 is a plain GAN")
    parser.add_argument("--seed", type=int, default=1,
                        help="1 starts G decreasing (see the module docstring)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = parser.parse_args(argv)
    # Networks this small gain nothing from intra-op threads, and one thread makes runs repeatable.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    G = train(steps=args.steps, ot_scale=args.ot_scale, seed=args.seed, batch_size=args.batch_size,
              progress=True)

    x = generate(G, GRID)
    np.savetxt(os.path.join(args.out, "toy_map.csv"), torch.stack([GRID, x], 1).numpy(), delimiter=",",
               header="z,x", comments="", fmt="%.6f")
    rms, monotone, fold = rms_to_optimal_map(GRID, x), monotone_fraction(GRID, x), largest_fold(GRID, x)
    samples = generate(G, torch.randn(100_000, generator=torch.Generator().manual_seed(args.seed + 1),
                                      dtype=torch.float64))
    title = (f"{'AFM' if args.ot_scale > 0 else 'plain GAN'}: ot_scale={args.ot_scale:g}, "
             f"steps={args.steps}, seed={args.seed}   rms_to_ot_map={rms:.4f}   "
             f"monotone_fraction={monotone:.4f}   largest_fold={fold:.4f}")
    draw_figure(GRID, x, samples, title, os.path.join(args.out, "toy.png"))
    print(f"rms_to_ot_map={rms:.4f} monotone_fraction={monotone:.4f} largest_fold={fold:.4f}")


if __name__ == "__main__":
    main()
