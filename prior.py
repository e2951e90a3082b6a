"""The flow's noise: N(0, I) as in the paper, or a Gaussian fitted to the training data (--prior data).

AFM moves noise z (t = 1) to data x (t = 0), and its OT term ||G(z) - z||^2 (eqs. 11-12) holds G to the
W2-optimal map from the noise distribution to the data. The paper's noise is N(0, I) in SD-VAE latents, where
every dimension varies about as much as the noise does. In pixel space most dimensions barely vary (the black
background of Fashion-MNIST), so the OT term pulls G(z) towards pixel noise that D rejects, and a one-step G
lets go of z: each class collapses to a few images (docs/laptop.md).

--prior data draws z = mu + Sigma^(1/2) eps, eps ~ N(0, I), with mu and Sigma the mean and covariance of (up
to 20,000 of) the training images, a departure from the paper in the spirit of data-dependent priors for
diffusion (PriorGrad, Lee et al. 2022). The OT term then pulls G(z) towards an image-shaped z, and x_s and x_t
of multi-step training interpolate towards it (eq. 15). Sigma's eigenvalues are floored at 1e-4 of their mean,
so the source keeps a density and Brenier's theorem still gives a unique optimal map. Sigma^(1/2) is the
symmetric square root V diag(sqrt(lambda)) V^T, so the standard prior is the special case mu = 0, Sigma = I.

Every place that draws the flow's noise draws eps ~ N(0, I) as before and maps it through the prior: training
pairs (losses.make_pairs), sampling (sample.sample), the judge, flow_matching.py. The standard prior is the
identity map, so a run without --prior data draws exactly the numbers it always did.
"""

import torch
import torch.nn as nn

import data


class GaussianPrior(nn.Module):
    """eps (N, C, H, W) ~ N(0, I) -> z = mean + eps Sigma^(1/2). mean (C, H, W) and sqrt_cov (D, D),
    D = C H W, are buffers (saved in the checkpoint); both None is the standard normal."""

    def __init__(self, mean=None, sqrt_cov=None):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("sqrt_cov", sqrt_cov)

    @property
    def standard(self):
        return self.mean is None

    def forward(self, eps):
        if self.standard:
            return eps
        with torch.autocast(eps.device.type, enabled=False):  # a bf16 matmul would round the noise
            z = eps.flatten(1).float() @ self.sqrt_cov  # (N, D); sqrt_cov is symmetric
        return (z.view(eps.shape) + self.mean).to(eps.dtype)

    def noise_like(self, x):
        """A draw of the flow's noise with x's shape, dtype and device."""
        return self(torch.randn_like(x))


def fit(batches, max_samples=20_000, floor=1e-4):
    """A GaussianPrior from the first max_samples images of `batches` (an iterator of (x, y), x (B, C, H, W)
    as the networks see it). Computed in float64 on the CPU, so every rank of a run fits the same numbers."""
    images, count = [], 0
    for x, _ in batches:
        images.append(x.detach().to("cpu", torch.float64))
        count += len(x)
        if count >= max_samples:
            break
    x = torch.cat(images)[:max_samples]  # (N, C, H, W)
    flat = x.flatten(1)  # (N, D)
    mean = flat.mean(0)
    centred = flat - mean
    covariance = centred.T @ centred / max(len(flat) - 1, 1)  # (D, D)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp(min=floor * eigenvalues.clamp(min=0).mean())
    sqrt_cov = eigenvectors @ torch.diag(eigenvalues.sqrt()) @ eigenvectors.T
    return GaussianPrior(mean.view(x.shape[1:]).float(), sqrt_cov.float())


def from_state(state):
    """The prior a checkpoint holds ("prior": its state dict, or {} for the standard normal)."""
    state = state or {}
    return GaussianPrior(state.get("mean"), state.get("sqrt_cov"))



FIT_SAMPLES = 20_000


def for_run(kind, source, seed, resume_state=None):
    """The prior of a train.py or flow_matching.py run: the checkpoint's when resuming, else N(0, I) for kind
    "standard" or one fitted to the training data of source (vae.TrainingData) for kind "data". The fit reads
    the images as stored (no flips) through a loader of its own, so the training loader's position and the
    random streams are untouched."""
    if resume_state is not None:
        return from_state(resume_state.get("prior"))
    if kind == "standard":
        return GaussianPrior()
    dataset = source.loader.dataset
    loader = data.Loader(dataset, min(500, len(dataset)), seed=seed, flip=False)
    fitted = fit(loader, min(FIT_SAMPLES, len(dataset)))
    if fitted.mean.shape[0] != source.in_channels:
        raise data.DataError("--prior data is fitted to what the networks see: for --data imagenet, extract "
                             "the latents once with `python vae.py` and train on them")
    return fitted
