"""Data augmentation: the discriminator's paired augmentation and the classifier's affine augmentation.

Discriminator augmentation (paper sec. 3.9, App. D, eqs. 33-34). With rho a random augmentation,

    L_adv^D = E[ f(D(phi(rho(x))), D(phi(rho(G(z))))) ],
    L_adv^G = E[ f(D(phi(rho(G(z)))), D(phi(rho(x)))) ],

and the SAME rho goes to each real/fake pair: the relativistic loss compares D(real[i]) with D(fake[i]), so
the two must be seen through the same transform. The authors concatenate real and fake along channels and
augment the result once; `PairedAugment` does exactly that. Their Algorithm 1 (Kornia, run on latents) is

    RandomTranslate(translate_x=(0, 0.3), translate_y=(0, 0.3), resample=NEAREST, p=0.4)
    3 x RandomErasing(scale=(0.1, 0.5), p=0.4)

and it is used only in the guided phase (p = 0.4); otherwise augmentation is off.

Reading of Kornia's RandomTranslate (checked against its source): a pair (a, b) is the sampling range itself,
dx ~ U(a, b) * width, not a symmetric magnitude. Its docstring says "maximum absolute fraction", but the
generator passes the pair unchanged to Uniform(a, b). So (0, 0.3) shifts content right and down only, by 0-30%
of the size, and the uncovered strip on the left and top is filled with zeros (the default padding). A
float `translate` here means the symmetric range (-translate, translate), which is what RandomAffine does.

Fill value. Both the translation border and the erased rectangles are filled with 0, like Kornia's defaults.
For SD-VAE latents (scaled by 0.18215) 0 is about the mean; for pixels in [-1, 1] it is mid-grey.

Classifier augmentation (paper sec. 4): the time-conditioned classifier for guidance is trained with Kornia
RandomAffine(p=0.8, degrees=10, translate=0.3, scale=(1.0, 1.3), padding_mode="reflection"); `AffineAugment`
is the same transform written with affine_grid / grid_sample.

Everything here is vectorized over the batch, differentiable with respect to the inputs, and draws its random
numbers from torch's global generator on the input's device, so seeded training stays reproducible.
"""

import math

import torch
import torch.nn.functional as F


def translate(x, shift_y, shift_x):
    """Move the content of x[i] down by shift_y[i] and right by shift_x[i] whole pixels; zeros fill the rest.

    x: (N, C, H, W); shift_y, shift_x: (N,) integers, negative moves up / left. out[i, :, r, c] equals
    x[i, :, r - shift_y[i], c - shift_x[i]] where that pixel exists. An integer shift needs no interpolation,
    so every output value is an exact copy of an input value or 0 (Kornia's NEAREST resampling).
    """
    N, C, H, W = x.shape
    rows = torch.arange(H, device=x.device).view(1, H, 1) - shift_y.view(N, 1, 1)  # (N, H, 1) source row
    cols = torch.arange(W, device=x.device).view(1, 1, W) - shift_x.view(N, 1, 1)  # (N, 1, W) source column
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)  # (N, H, W)
    source = rows.clamp(0, H - 1) * W + cols.clamp(0, W - 1)  # (N, H, W) flat index into H * W
    moved = x.flatten(2).gather(2, source.view(N, 1, H * W).expand(N, C, H * W)).view(N, C, H, W)
    return moved.masked_fill(~inside.unsqueeze(1), 0)


def random_rectangles(N, H, W, area_range, log_ratio_range, device):
    """One random axis-aligned rectangle per sample, as a boolean mask (N, H, W).

    Like RandomErasing: the area is a fraction U(area_range) of H * W, the aspect ratio height / width is
    log-uniform in exp(log_ratio_range); height and width are rounded to whole pixels (at least 1, at most the
    image) and the top-left corner is uniform over the positions where the rectangle fits. (Kornia draws the
    ratio from U(0.3, 1) or U(1, 3.3) with even odds; the log-uniform draw of torchvision's RandomErasing
    spans the same range with the same even split between tall and wide.)
    """
    area = torch.empty(N, device=device).uniform_(*area_range) * (H * W)  # (N,) in pixels
    ratio = torch.empty(N, device=device).uniform_(*log_ratio_range).exp()  # (N,) height / width
    height = (area * ratio).sqrt().round().clamp(1, H).long()  # (N,)
    width = (area / ratio).sqrt().round().clamp(1, W).long()  # (N,)
    top = (torch.rand(N, device=device) * (H - height + 1)).long()  # (N,) in [0, H - height]
    left = (torch.rand(N, device=device) * (W - width + 1)).long()  # (N,) in [0, W - width]
    rows = torch.arange(H, device=device).view(1, H)
    cols = torch.arange(W, device=device).view(1, W)
    in_rows = (rows >= top.view(N, 1)) & (rows < (top + height).view(N, 1))  # (N, H)
    in_cols = (cols >= left.view(N, 1)) & (cols < (left + width).view(N, 1))  # (N, W)
    return in_rows.view(N, H, 1) & in_cols.view(N, 1, W)


class PairedAugment:
    """The discriminator augmentation rho of eqs. 33-34: `real_aug, fake_aug = augment(real, fake)`.

    real, fake: (N, C, H, W), the same shape; sample i of both gets the same random transform, and each sample
    gets its own. In order:
    1. with probability p, an integer translation by dy / H, dx / W drawn from the `translate` range
       (a float t means (-t, t); a pair (lo, hi) is Kornia's translate_x / translate_y range, taken as is);
    2. `cutouts` times, each with probability p, one rectangle of area cutout_scale * H * W set to 0.

    Output shape and dtypes are those of the inputs, and values stay in the inputs' values plus 0. p = 0 is
    the exact identity and draws no random numbers. The defaults are the authors' Algorithm 1 (p = 0.4 is
    their guided phase).
    """

    def __init__(self, p=0.4, translate=(0.0, 0.3), cutouts=3, cutout_scale=(0.1, 0.5),
                 cutout_ratio=(0.3, 3.3)):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        translate_range = (-translate, translate) if isinstance(translate, (int, float)) else tuple(translate)
        if not -1 <= translate_range[0] <= translate_range[1] <= 1:
            raise ValueError(f"translate must be a fraction in [0, 1] or a range inside [-1, 1], "
                             f"got {translate}")
        if not 0 < cutout_scale[0] <= cutout_scale[1] <= 1:
            raise ValueError(f"cutout_scale must be a range inside (0, 1], got {cutout_scale}")
        self.p = p
        self.translate_range = translate_range
        self.cutouts = cutouts
        self.cutout_scale = tuple(cutout_scale)
        self.cutout_log_ratio = (math.log(cutout_ratio[0]), math.log(cutout_ratio[1]))

    def __call__(self, real, fake):
        if real.shape != fake.shape:
            raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and "
                             f"{tuple(fake.shape)}")
        if self.p == 0:
            return real, fake
        C = real.shape[1]
        both = torch.cat([real, fake], dim=1)  # (N, 2C, H, W): one transform per pair, as the authors do
        N, _, H, W = both.shape
        device = both.device

        applied = torch.rand(N, device=device) < self.p  # (N,)
        # (N,) each, 0 where not applied
        shift_y = torch.randint(*self._shift_bounds(H), (N,), device=device) * applied
        shift_x = torch.randint(*self._shift_bounds(W), (N,), device=device) * applied
        both = translate(both, shift_y, shift_x)

        for _ in range(self.cutouts):
            applied = torch.rand(N, device=device) < self.p  # (N,)
            box = random_rectangles(N, H, W, self.cutout_scale, self.cutout_log_ratio, device)  # (N, H, W)
            both = both.masked_fill((box & applied.view(N, 1, 1)).unsqueeze(1), 0)

        real_aug, fake_aug = both.split([C, C], dim=1)
        return real_aug.to(real.dtype), fake_aug.to(fake.dtype)

    def _shift_bounds(self, size):
        """(low, high) for torch.randint, so the shift is uniform over the whole pixels k with
        lo * size <= k <= hi * size (Kornia draws U(lo, hi) * size and rounds). A tiny slack absorbs float
        error such as 0.3 * 30 = 8.999..."""
        lo, hi = self.translate_range
        return math.ceil(lo * size - 1e-6), math.floor(hi * size + 1e-6) + 1


class AffineAugment:
    """The classifier's training augmentation: `x_aug = augment(x)`, x: (N, C, H, W).

    With probability p per sample: rotate by U(-degrees, degrees), zoom by U(scale) (> 1 enlarges the
    content), and shift by U(-translate, translate) of the width and height, all about the image center, with
    bilinear sampling and reflection padding (Kornia RandomAffine(p=0.8, degrees=10, translate=0.3,
    scale=(1.0, 1.3), padding_mode="reflection")). The range of angles is symmetric, so the rotation's sign
    convention does not matter. Samples not drawn, and every sample when p = 0, are returned unchanged.
    """

    def __init__(self, p=0.8, degrees=10.0, translate=0.3, scale=(1.0, 1.3)):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p
        self.degrees = degrees
        self.translate = translate
        self.scale = tuple(scale)

    def __call__(self, x):
        if self.p == 0:
            return x
        N, _, H, W = x.shape
        device = x.device
        applied = torch.rand(N, device=device) < self.p  # (N,)
        angle = torch.empty(N, device=device).uniform_(-self.degrees, self.degrees).deg2rad()  # (N,)
        zoom = torch.empty(N, device=device).uniform_(*self.scale)  # (N,)
        shift = torch.empty(N, 2, device=device).uniform_(-self.translate, self.translate)  # (N, 2), (x, y)
        shift = shift * torch.tensor([W, H], device=device)  # in pixels
        warped = warp_affine(x, affine_theta(angle, zoom, shift, H, W))
        return torch.where(applied.view(N, 1, 1, 1), warped, x)


def affine_theta(angle, zoom, shift, H, W):
    """The (N, 2, 3) matrix for F.affine_grid that rotates by `angle` (radians), zooms by `zoom` and then
    moves the content by `shift` = (dx, dy) pixels, about the image center.

    In pixel coordinates u measured from the center, the forward map is u_out = zoom * R u_in + shift.
    affine_grid needs the inverse, in coordinates normalized to [-1, 1]: with D = diag(W / 2, H / 2),
    n_in = D^-1 M D n_out - D^-1 M shift, where M = R^T / zoom. Going through pixels keeps non-square images
    from being sheared by the rotation.
    """
    cos, sin = angle.cos(), angle.sin()
    inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (N, 2, 2) R^T
    inverse = inverse / zoom.view(-1, 1, 1)  # M
    half = torch.tensor([W / 2, H / 2], device=angle.device)  # D's diagonal
    linear = inverse * half.view(1, 1, 2) / half.view(1, 2, 1)  # (N, 2, 2) D^-1 M D
    offset = -(inverse @ shift.unsqueeze(-1)) / half.view(1, 2, 1)  # (N, 2, 1) -D^-1 M shift
    return torch.cat([linear, offset], dim=-1)  # (N, 2, 3)


def warp_affine(x, theta):
    """Resample x (N, C, H, W) at affine_grid(theta): bilinear, reflection padding, pixel centers."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
