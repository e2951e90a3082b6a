"""The AFM objective: one small function per term, then the discriminator and generator objectives.

Time convention: t = 0 is data, t = 1 is noise, x_t = (1 - t) x + t z (eq. 15). A generator maps x_s at a
source time s to a target time t; the 1-NFE generator maps pure noise (s = 1) to data (t = 0).

Discriminator step (eqs. 13, 16, 18, 19):
    L_D = f(D(x_t), D(G(x_s))) + lambda_gp * [w R1 + w R2] + lambda_cp * (D(x_t) + D(G(x_s)))^2
Generator step (eqs. 14, 17, 20, 26):
    L_G = f(D(phi(G(x_s))), D(x_t)) + lambda_ot * ||G(x_s) - x_s||^2 / (n w) [+ lambda_cg * CE(C(x_t'), y)]
with f(a, b) = softplus(-(a - b)) the relativistic pairing loss, R1/R2 the finite-difference gradient
penalties, phi the gradient normalization of gradnorm.py, and w = max(|s - t|, 0.001) (eq. 21),
which is 1 for 1-NFE.
With the paired augmentation rho (eqs. 33-34) D sees rho(x_t) and rho(G(x_s)), and G's adversarial term is
f(D(phi(rho(G(x_s)))), D(rho(x_t))): phi comes after rho; the OT and guidance terms never see rho.
"""

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------------------
# Times


def interpolate(x, noise, t):
    """x_t = (1 - t) x + t noise (eq. 15). t: (N,), broadcast over the other dimensions."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * noise


def sample_times(batch_size, nfe, device):
    """Source and target times for one batch, each (N,).

    nfe = 1:     s = 1, t = 0.
    nfe = K:     s uniform on {1, 1 - 1/K, ..., 1/K}, t = s - 1/K: the K designated steps of K-step sampling.
    nfe = "any": s ~ U(0, 1), t ~ U(0, s) (sec. 3.3).
    """
    if nfe == "any":
        s = torch.rand(batch_size, device=device)
        return s, s * torch.rand(batch_size, device=device)
    step = torch.randint(1, nfe + 1, (batch_size,), device=device)
    return step / nfe, (step - 1) / nfe


def time_weight(s, t, floor=1e-3):
    """w(s, t) = max(|s - t|, delta) (eq. 21): multiplies the penalties, divides the OT loss."""
    return (s - t).abs().clamp(min=floor)


def predict(G, x_src, y, s, t, pred):
    """One generator step x_s -> x_t. pred "x": G outputs x_t directly (eq. 31 without the residual, used for
    1-NFE); pred "v": residual / velocity form x_t = x_s - (s - t) g(x_s, s, t)
    (eq. 32, used for multi-step)."""
    out = G(x_src, y, s, t)
    if pred == "x":
        return out
    return x_src - (s - t).view(-1, 1, 1, 1) * out


# ------------------------------------------------------------------------------------------------------------
# The terms


def relativistic_loss(pos, neg):
    """f(pos, neg) = -log sigmoid(pos - neg), averaged (eqs. 1-2). D: (real, fake); G: (fake, real).
    Sample i of pos is paired with sample i of neg (same class, same t)."""
    return F.softplus(neg - pos).mean()


def gradient_penalty(logits, logits_perturbed, eps, weight):
    """Finite-difference R1 / R2 (eqs. 3-6, 18-19): E[w (D(x + eps n) - D(x))^2 / eps^2]
    ~ E[w ||grad_x D||^2]. One extra forward instead of a double backward."""
    return (weight * (logits_perturbed - logits).square() / eps**2).mean()


def centering_penalty(logits_real, logits_fake):
    """(D(x) + D(G(z)))^2 (eq. 7): the relativistic loss only sees differences,
    so this keeps logits near 0."""
    return (logits_real + logits_fake).square().mean()


def ot_loss(x_pred, x_src, weight):
    """(1/n) ||G(x_s) - x_s||^2 / w (eqs. 11-12, 20): mean over C, H, W, divided by w,
    then mean over the batch."""
    return ((x_pred - x_src).square().flatten(1).mean(1) / weight).mean()


def classifier_guidance_loss(classifier, fake, y, t_lo, t_hi):
    """Flow-based classifier guidance (eq. 26): the classifier judges G's output re-noised to t' ~ U(lo, hi),
    with fresh noise. t' = 0 is plain classifier guidance (eq. 24)."""
    t_cg = t_lo + (t_hi - t_lo) * torch.rand(fake.shape[0], device=fake.device)
    x_cg = interpolate(fake, torch.randn_like(fake), t_cg)
    return F.cross_entropy(classifier(x_cg, t_cg), y)


# ------------------------------------------------------------------------------------------------------------
# The two objectives


def make_pairs(x, nfe, prior=None):
    """From a data batch x, the generator's input x_s and the matching real sample x_t (independent noises,
    drawn from prior.py's prior; None: N(0, I)). Returns x_src, real, s, t, w. For 1-NFE this is x_src = z,
    real = x."""
    noise_like = torch.randn_like if prior is None else prior.noise_like
    s, t = sample_times(x.shape[0], nfe, x.device)
    x_src = interpolate(x, noise_like(x), s)
    real = interpolate(x, noise_like(x), t)
    return x_src, real, s, t, time_weight(s, t)


def discriminator_objective(G, D, x, y, nfe=1, pred="x", gp_scale=0.25, cp_scale=0.01, gp_eps=0.01,
                            gp_ratio=0.25, augment=None, prior=None):
    """L_D for one batch (eq. 13 with eqs. 16-19). G runs under no_grad. D runs once, on
    [real, fake, real[:k] + eps n1, fake[:k] + eps n2] with k = max(1, round(gp_ratio B)).
    Returns the loss and a dict of detached metrics."""
    with torch.no_grad():
        x_src, real, s, t, w = make_pairs(x, nfe, prior)
        fake = predict(G, x_src, y, s, t, pred)
    if augment is not None:
        real, fake = augment(real, fake)
    B = x.shape[0]
    k = max(1, round(gp_ratio * B))
    real_perturbed = real[:k] + gp_eps * torch.randn_like(real[:k])
    fake_perturbed = fake[:k] + gp_eps * torch.randn_like(fake[:k])
    logits = D(torch.cat([real, fake, real_perturbed, fake_perturbed]),
               torch.cat([y, y, y[:k], y[:k]]), torch.cat([t, t, t[:k], t[:k]]))  # (2B + 2k,)
    logits_real, logits_fake, logits_real_p, logits_fake_p = logits.float().split([B, B, k, k])
    adv = relativistic_loss(logits_real, logits_fake)
    r1 = gradient_penalty(logits_real[:k], logits_real_p, gp_eps, w[:k])
    r2 = gradient_penalty(logits_fake[:k], logits_fake_p, gp_eps, w[:k])
    cp = centering_penalty(logits_real, logits_fake)
    loss = adv + gp_scale * (r1 + r2) + cp_scale * cp
    metrics = dict(d_loss=loss, d_adv=adv, d_r1=r1, d_r2=r2, d_cp=cp,
                   d_logits_real=logits_real.mean(), d_logits_fake=logits_fake.mean())
    return loss, {name: value.detach() for name, value in metrics.items()}


def generator_objective(G, D, gradnorm, x, y, nfe=1, pred="x", ot_scale=0.2, augment=None, guidance=None,
                        prior=None):
    """L_G for one batch (eq. 14 with eqs. 17, 20, 33-34). D's parameters must be frozen by the caller. The
    real/fake pair is augmented first; then the gradient normalization sits on the augmented fake's way into
    D, so phi measures the gradient D actually sends back (a cutout or a shift past the border drops part of
    it). The OT term and the guidance see the un-augmented G output.
    guidance: an optional callable (fake, y, t) -> loss already scaled by lambda_cg.

    D sees real and fake in two calls, the real one under no_grad. One call on [real, fake] would give the
    same logits (D has no batch statistics), but its backward would carry gradients through D for the real
    half too, only to drop them: 3 instead of 4 D passes over B samples,
    and no stored activations for the real half."""
    x_src, real, s, t, w = make_pairs(x, nfe, prior)
    fake = predict(G, x_src, y, s, t, pred)
    real_for_d, fake_for_d = augment(real, fake) if augment is not None else (real, fake)  # rho (eq. 33)
    with torch.no_grad():
        logits_real = D(real_for_d, y, t).float()
    logits_fake = D(gradnorm(fake_for_d), y, t).float()  # D(phi(rho(G(z)))) (eq. 34)
    adv = relativistic_loss(logits_fake, logits_real)
    ot = ot_loss(fake.float(), x_src.float(), w)
    loss = adv + ot_scale * ot
    metrics = dict(g_adv=adv, g_ot=ot, g_logits_real=logits_real.mean(), g_logits_fake=logits_fake.mean())
    if guidance is not None:
        cg = guidance(fake, y, t)
        loss = loss + cg
        metrics["g_cg"] = cg
    metrics["g_loss"] = loss
    return loss, {name: value.detach() for name, value in metrics.items()}
