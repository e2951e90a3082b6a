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
symmetric square root, kept as its eigenvectors and their standard deviations (GaussianPrior).

Every place that draws the flow's noise draws eps ~ N(0, I) as before and maps it through the prior:
training pairs (losses.make_pairs), sampling (sample.sample_images), the judge, flow_matching.py. The standard
prior is the identity map, so a run without --prior data draws exactly the numbers it always did.
"""

import torch
import torch.nn as nn

import data


class GaussianPrior(nn.Module):
    """eps (N, C, H, W) ~ N(0, I) -> z = mean + Sigma^(1/2) eps, with the symmetric square root

        Sigma^(1/2) = U diag(scales) U^T + floor_scale (I - U U^T),

    U (D, r) orthonormal directions of the data (D = C H W; r = D unless there were fewer images than
    dimensions), scales their standard deviations, floor_scale the standard deviation left in every other
    direction. The buffers mean (C, H, W), basis U, scales (r,) and floor_scale () are saved in the
    checkpoint; none of them is the standard normal."""

    def __init__(self, mean=None, basis=None, scales=None, floor_scale=None):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("basis", basis)
        self.register_buffer("scales", scales)
        self.register_buffer("floor_scale", floor_scale)

    @property
    def standard(self):
        return self.mean is None

    def forward(self, eps):
        if self.standard:
            return eps
        with torch.autocast(eps.device.type, enabled=False):  # a bf16 matmul would round the noise
            flat = eps.flatten(1).float()  # (N, D)
            along = (flat @ self.basis) * (self.scales - self.floor_scale)  # (N, r)
            z = self.floor_scale * flat + along @ self.basis.T  # (N, D)
        return (z.view(eps.shape) + self.mean).to(eps.dtype)

    def sqrt_cov(self):
        """Sigma^(1/2) as a (D, D) matrix, for analysis; sampling never forms it."""
        D = self.basis.shape[0]
        identity = torch.eye(D, dtype=self.basis.dtype, device=self.basis.device)
        return self.basis @ torch.diag(self.scales) @ self.basis.T + self.floor_scale * (
            identity - self.basis @ self.basis.T)

    def noise_like(self, x):
        """A draw of the flow's noise with x's shape, dtype and device."""
        return self(torch.randn_like(x))


FIT_SAMPLES = 20_000  # images a fit reads at most


def fit(batches, max_samples=FIT_SAMPLES, floor=1e-4):
    """A GaussianPrior from the first max_samples images of `batches` (an iterator of (x, y), x (B, C, H, W)
    as the networks see it). Computed in float64 on the CPU, so every rank of a run fits the same numbers.
    Variances below floor times the mean variance are raised to it."""
    images, count = [], 0
    for x, _ in batches:
        images.append(x.detach().to("cpu", torch.float64))
        count += len(x)
        if count >= max_samples:
            break
    x = torch.cat(images)[:max_samples]  # (N, C, H, W)
    flat = x.flatten(1)  # (N, D)
    N, D = flat.shape
    mean = flat.mean(0)
    centred = (flat - mean) / max(N - 1, 1) ** 0.5  # Sigma = centred^T centred
    if N > D:  # the eigenvectors of Sigma (D, D) itself
        variances, basis = torch.linalg.eigh(centred.T @ centred)
    else:  # fewer images than dimensions: Sigma has rank < N, found from the (N, N) Gram matrix
        variances, vectors = torch.linalg.eigh(centred @ centred.T)
        kept = variances > 1e-12 * variances.max().clamp(min=1e-300)
        variances = variances[kept]
        basis = centred.T @ vectors[:, kept] / variances.sqrt()  # (D, r) unit eigenvectors of Sigma
    floor_variance = floor * variances.clamp(min=0).sum() / D  # floor x the mean variance (trace / D)
    scales = variances.clamp(min=floor_variance).sqrt()
    return GaussianPrior(mean.view(x.shape[1:]).float(), basis.float(), scales.float(),
                         floor_variance.sqrt().float())


def from_state(state):
    """The prior a checkpoint holds ("prior": its state dict, or {} for the standard normal)."""
    state = state or {}
    return GaussianPrior(*(state.get(name) for name in ("mean", "basis", "scales", "floor_scale")))


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
    loader = data.Loader(dataset, min(500, len(dataset)), seed=seed, flip=False,
                         reported=source.loader.reported)  # an unreadable file is named once, not twice
    fitted = fit(loader, min(FIT_SAMPLES, loader.batches_per_epoch * loader.batch_size))  # one epoch at most
    if fitted.mean.shape[0] != source.in_channels:
        raise data.DataError("--prior data is fitted to what the networks see: for --data imagenet, extract "
                             "the latents once with `python vae.py` and train on them")
    return fitted
