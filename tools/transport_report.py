"""Does a one-step generator transport its noise? The OT term (paper eqs. 11-12) asks G to move each z as
little as possible, which makes G's map the W2-optimal one. This measures, per class, how far a trained G is
from that, and how hard the OT term pulls against D's push.

    python tools/transport_report.py runs/afm/ckpt.pt --data fashion-mnist
    python tools/transport_report.py runs/afm/ckpt.pt --data folder --data-path DIR --classes 0 7

Per class, with 200 noises z from the run's prior (prior.py: N(0, I), or N(m_z, S_z) fitted to the data) and
the class's real training images x (n = C H W values each):

    cost          mean ||G(z) - z||^2 / n of the EMA generator: the OT loss at lambda_ot = 1
    independent   E ||x - z||^2 / n with x and z independent: what pairing each noise with an unrelated
                  image of the class costs
    W2 bound      W2^2(N(m_z, S_z), N(m, S)) / n
                  = (||m - m_z||^2 + tr(S_z + S - 2 (S_z^(1/2) S S_z^(1/2))^(1/2))) / n, with m and S
                  the mean and covariance of the class's images (Gelbrich): no coupling of the noise with
                  images of that mean and covariance costs less
    corr          the correlation of G(z) with z, over the pixels of all samples (after removing G's mean
                  and the prior's)
    OT / D        per sample, the OT gradient d(lambda_ot * L_ot)/dG(z) over D's adversarial gradient after
                  gradient normalization (eq. 23), as the generator step sees them: in all n directions, and
                  in the k directions along which the class's images vary most (its top principal components),
                  at lambda_ot = 1; multiply by the run's lambda_ot. The second number is what can turn one
                  garment into another; the rest of the pull moves G(z) towards z's pixel noise.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint  # noqa: E402
import losses  # noqa: E402
import prior  # noqa: E402
import quality  # noqa: E402
from model import Discriminator, Generator  # noqa: E402


def class_gaussian(images, k, source_mean=None, source_root=None):
    """From the covariance S of images (N, n), with mean m, and the source N(source_mean, R R), with R =
    source_root symmetric (None: N(0, I)):
    -> (Gelbrich's bound W2^2(source, N(m, S)) / n, the cost of the Gaussian optimal map;
        the k unit directions (n, k) along which the images vary most; their share of the variance)."""
    mean = images.mean(0)
    covariance = np.cov(images, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    eigenvalues = np.clip(eigenvalues, 0, None)
    n = images.shape[1]
    if source_root is None:  # R = I: the eigenvalues of R S R are S's own
        source_mean, source_trace, cross = np.zeros(n), n, eigenvalues
    else:
        source_trace = float((source_root * source_root).sum())  # tr(R R) for a symmetric R
        cross = np.clip(np.linalg.eigvalsh(source_root @ covariance @ source_root), 0, None)
    offset = mean - source_mean
    bound = float((offset @ offset + source_trace + eigenvalues.sum() - 2 * np.sqrt(cross).sum()) / n)
    top = eigenvectors[:, ::-1][:, :k]
    return bound, top, float(eigenvalues[::-1][:k].sum() / eigenvalues.sum())


def gradients(G, D, z, real, y):
    """-> G(z), and the per-sample gradients (B, n) that reach it in the generator step: D's relativistic loss
    through gradient normalization (its EMA at steady state: the batch's own norm), and the OT loss at
    lambda_ot = 1."""
    with torch.no_grad():
        fake = G(z, y)
        logits_real = D(real, y)
    fake.requires_grad_(True)
    adv = losses.relativistic_loss(D(fake, y), logits_real)
    (grad_adv,) = torch.autograd.grad(adv, fake)
    grad_adv = grad_adv / (grad_adv.square().sum() * grad_adv.numel()).sqrt()  # eq. 23, target scale 1
    ot = losses.ot_loss(fake, z, torch.ones(len(z)))
    (grad_ot,) = torch.autograd.grad(ot, fake)
    return fake.detach().flatten(1), grad_adv.flatten(1), grad_ot.flatten(1)


def report(args):
    run = checkpoint.load(args.ckpt)
    G = Generator(**run["generator_kwargs"]).eval()
    checkpoint.load_weights(G, run["ema"], what=f"{args.ckpt} [ema]")
    D = Discriminator(**run["discriminator_kwargs"]).eval()
    checkpoint.load_weights(D, run["D"], what=f"{args.ckpt} [D]")
    if G.use_t_src or G.use_t_tgt:
        sys.exit(f"error: {args.ckpt} is a multi-step generator; this reads one-step (--nfe 1) runs")
    images, labels, _, _ = quality.real_splits(args.data, args.data_path, G.input_size)
    classes = args.classes or range(G.num_classes)
    missing = [c for c in classes if not (labels == c).any()]
    if missing:
        sys.exit(f"error: --classes {missing} are not among the data's classes 0-{G.num_classes - 1}")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    config = run["config"]
    noise_prior = prior.from_state(run.get("prior"))
    prior_mean = np.zeros(G.in_channels * G.input_size ** 2)
    prior_root = None
    if not noise_prior.standard:
        prior_mean = noise_prior.mean.flatten().double().numpy()
        prior_root = noise_prior.sqrt_cov().double().numpy()
    prior_trace = prior_mean.size if prior_root is None else float((prior_root * prior_root).sum())
    print(f"{args.ckpt}: step {run['step']}, prior {config.get('prior', 'standard')}, lambda_ot "
          f"{config['ot_start']} -> {config['ot_end']} over {config['ot_decay_steps']} steps; OT / D at "
          f"lambda_ot = 1, top-{args.k} directions")
    print("class  cost   independent  W2 bound  corr   OT/D all  OT/D top-k  (top-k: share of variance)")
    for c in classes:
        x = images[labels == c].reshape(int((labels == c).sum()), -1).astype(np.float64) / 127.5 - 1  # (N, n)
        y = torch.full((args.noises,), c)
        z = noise_prior(torch.randn(args.noises, G.in_channels, G.input_size, G.input_size))
        real = torch.from_numpy(x[rng.choice(len(x), args.noises)]).float().view_as(z)
        fake, grad_adv, grad_ot = gradients(G, D, z, real, y)
        z = z.flatten(1)
        cost = (fake - z).square().mean().item()
        # E||x - z||^2 = E||x||^2 - 2 E[x] . m_z + ||m_z||^2 + tr(S_z) for independent x and z
        independent = float(((x ** 2).sum(1).mean() - 2 * x.mean(0) @ prior_mean + prior_mean @ prior_mean
                             + prior_trace) / x.shape[1])
        centred, z_centred = fake - fake.mean(0), z - torch.from_numpy(prior_mean).float()
        corr = ((centred * z_centred).sum() / (centred.norm() * z_centred.norm())).item()
        bound, U, share = class_gaussian(x, args.k, prior_mean, prior_root)
        U = torch.from_numpy(U.copy()).float()  # (n, k)
        ratio_all = (grad_ot.norm(dim=1) / grad_adv.norm(dim=1)).median().item()
        ratio_top = ((grad_ot @ U).norm(dim=1) / (grad_adv @ U).norm(dim=1)).median().item()
        print(f"{c:5d}  {cost:.3f}  {independent:11.3f}  {bound:8.3f}  {corr:5.2f}  {ratio_all:8.2f}  "
              f"{ratio_top:10.2f}  ({share:.2f})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a train.py checkpoint of a one-step generator (ckpt.pt)")
    p.add_argument("--data", default="fashion-mnist", help="the data it was trained on, as train.py's --data")
    p.add_argument("--data-path", help="as train.py's --data-path")
    p.add_argument("--classes", type=int, nargs="*", help="class indices (default: all)")
    p.add_argument("--noises", type=int, default=200, help="noises per class")
    p.add_argument("--k", type=int, default=20, help="principal directions of each class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        report(args)
    except (checkpoint.CheckpointError, quality.data.DataError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
