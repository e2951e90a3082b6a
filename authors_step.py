"""The authors' training step, as their public trainer runs it: the baseline that `bench.py --baseline` times
against train.train_step.

Source: ByteDance-Seed/Adversarial-Flow-Models, train_adversarial_flow_imagenet.py (AdversarialFlowTrainer's
training_step, optimizer_step and ema_step), written plainly with losses.py's terms, so that it computes
train.py's objective (paper sec. 3, Algorithm 2; tests/test_bench.py checks the losses agree).

The same as train.train_step: G under no grad in the D update, with ONE D forward on the concatenation
[real, fake, real[:k] + eps n1, fake[:k] + eps n2] (their trainer concatenates; the paper's Algorithm 2 draws
four calls); D's parameters frozen (requires_grad False) in the G update; gradient clipping of both networks.
Different, and so what bench.py's `ratio` measures:
  - the G update calls D twice, on real and on gradnorm(fake);
  - AdamW as torch builds it by default (foreach on CUDA, a per-tensor loop on CPU), never fused;
  - the EMA is a Python loop of lerp_, one call per parameter;
  - a loss.item() per update (their progress bar) instead of train.py's finiteness checks;
  - nothing is compiled (their trainer compiles only the VAE and the classifier).
Left out, as logging only: their per-update latent statistics and gradient captures.
"""

import copy

import torch

import losses
import train
from gradnorm import GradientNormalization
from model import Discriminator, Generator


def build_nets(args, generator_kwargs, discriminator_kwargs, device):
    """Fresh networks as the authors' trainer builds them: the EMA a deep copy of G, torch's default AdamW.
    Held in train.Nets, with the plain modules everywhere (the authors' step calls nets.G and nets.D only)."""
    G = Generator(**generator_kwargs).to(device)
    D = Discriminator(**discriminator_kwargs).to(device)
    adamw = dict(betas=(0.0, 0.9), eps=1e-8, weight_decay=args.weight_decay)
    return train.Nets(G, D, copy.deepcopy(G), GradientNormalization().to(device),
                      torch.optim.AdamW(G.parameters(), lr=args.g_lr, **adamw),
                      torch.optim.AdamW(D.parameters(), lr=args.lr, **adamw), G_train=G, G_frozen=G,
                      D_train=D, D_frozen=D, d_params=[p for p in D.parameters() if p.requires_grad])


def d_update(nets, args, x, y, autocast, augment=None):
    """The authors' D update: D's parameters set to require grad, G under no grad, one D forward on real, fake
    and the perturbed subsets, backward, clipping, AdamW, zero_grad of both optimizers. Returns the loss."""
    for p in nets.d_params:
        p.requires_grad_(True)
    with autocast():
        x_src, real, s, t, w = losses.make_pairs(x, args.nfe)
        with torch.no_grad():
            fake = losses.predict(nets.G, x_src, y, s, t, args.pred)
        if augment is not None:
            real, fake = augment(real, fake)
        B, k = x.shape[0], max(1, round(args.gp_ratio * x.shape[0]))
        real_gp = real[:k] + args.gp_eps * torch.randn_like(real[:k])
        fake_gp = fake[:k] + args.gp_eps * torch.randn_like(fake[:k])
        logits = nets.D(torch.cat([real, fake, real_gp, fake_gp]), torch.cat([y, y, y[:k], y[:k]]),
                        torch.cat([t, t, t[:k], t[:k]]))
        logits_real, logits_fake, logits_real_gp, logits_fake_gp = logits.float().split([B, B, k, k])
        loss = (losses.relativistic_loss(logits_real, logits_fake)
                + args.gp_scale * losses.gradient_penalty(logits_real[:k], logits_real_gp, args.gp_eps, w[:k])
                + args.gp_scale * losses.gradient_penalty(logits_fake[:k], logits_fake_gp, args.gp_eps, w[:k])
                + args.cp_scale * losses.centering_penalty(logits_real, logits_fake))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(nets.D.parameters(), args.grad_clip)
    nets.opt_d.step()
    nets.opt_d.zero_grad()
    nets.opt_g.zero_grad()
    return loss.item()


def g_update(nets, args, x, y, ot_scale, autocast, augment=None, guidance=None):
    """The authors' G update: D's parameters frozen, D(real) and D(gradnorm(fake)) as two calls (after the
    paired augmentation, if any), the OT loss and the guidance term on the un-augmented fake; backward,
    clipping, AdamW, zero_grad of both optimizers, the EMA loop. Returns the loss."""
    with autocast():
        x_src, real, s, t, w = losses.make_pairs(x, args.nfe)
        fake = losses.predict(nets.G, x_src, y, s, t, args.pred)
        for p in nets.d_params:
            p.requires_grad_(False)
        real_aug, fake_aug = augment(real, fake) if augment is not None else (real, fake)
        logits_real = nets.D(real_aug, y, t).float()
        logits_fake = nets.D(nets.gradnorm(fake_aug), y, t).float()
        loss = (losses.relativistic_loss(logits_fake, logits_real)
                + ot_scale * losses.ot_loss(fake.float(), x_src.float(), w))
        if guidance is not None:
            loss = loss + guidance(fake, y, t)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(nets.G.parameters(), args.grad_clip)
    nets.opt_g.step()
    nets.opt_d.zero_grad()
    nets.opt_g.zero_grad()
    with torch.no_grad():
        for ema_p, p in zip(nets.ema.parameters(), nets.G.parameters()):
            ema_p.lerp_(p, 1 - args.ema_decay)
    return loss.item()


def train_step(nets, args, x_d, y_d, x_g, y_g, ot_scale, autocast, augment=None, guidance=None):
    """The baseline iteration: the authors' D update, then their G update (their ttur 1 alternation)."""
    return (d_update(nets, args, x_d, y_d, autocast, augment),
            g_update(nets, args, x_g, y_g, ot_scale, autocast, augment, guidance))
