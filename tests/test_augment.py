"""augment.py: the paired discriminator augmentation (paper App. D, Algorithm 1) and the
classifier's affine one.

Most tests feed a "coordinate image": every pixel holds a distinct positive number, so each output pixel tells
exactly which input pixel it was copied from (or that it was filled with 0). That turns "the same transform
was applied to real[i] and fake[i]" and "the translation is an integer shift" into exact checks.
"""

import math

import pytest
import torch

from augment import AffineAugment, PairedAugment, affine_theta, translate, warp_affine

pytestmark = pytest.mark.usefixtures("one_thread")

NO_TRANSLATE = (0.0, 0.0)


def coordinate_image(N, C, H, W):
    """(N, C, H, W) float64 with pixel (c, r, col) = 1 + (c * H + r) * W + col: positive and
    distinct per sample."""
    return torch.arange(1, C * H * W + 1, dtype=torch.float64).view(1, C, H, W).repeat(N, 1, 1, 1)


def decode(out, C, H, W):
    """Source (channel, row, col) of each pixel of an augmented coordinate image, and where it was
    kept (not 0)."""
    kept = out != 0
    flat = (out - 1).clamp(min=0).long()
    return flat // (H * W), flat // W % H, flat % W, kept


def inferred_shifts(out, C, H, W):
    """Per-sample (dy, dx) of an augmented coordinate image; asserts every kept pixel moved by that same shift
    and stayed in its channel, so the transform is a pure integer translation plus zero fills."""
    N = out.shape[0]
    channel, row, col = (v.double() for v in decode(out, C, H, W)[:3])
    kept = out != 0
    assert kept.flatten(1).any(1).all()
    rows = torch.arange(H, dtype=torch.float64).view(1, 1, H, 1)
    cols = torch.arange(W, dtype=torch.float64).view(1, 1, 1, W)
    dy = torch.where(kept, rows - row, torch.nan).flatten(1)  # (N, C H W)
    dx = torch.where(kept, cols - col, torch.nan).flatten(1)
    channels = torch.arange(C, dtype=torch.float64).view(1, C, 1, 1)
    assert torch.equal(torch.where(kept, channel, 0), torch.where(kept, channels.expand_as(channel), 0))
    dy_i, dx_i = dy.nanmean(1), dx.nanmean(1)
    assert torch.equal(torch.where(kept.flatten(1), dy - dy_i.view(N, 1), 0), torch.zeros_like(dy))
    assert torch.equal(torch.where(kept.flatten(1), dx - dx_i.view(N, 1), 0), torch.zeros_like(dx))
    return dy_i.long(), dx_i.long()


# ------------------------------------------------------------------------------------------------------------
# PairedAugment: one transform per pair, a different one per sample


def test_same_transform_for_real_and_fake_of_a_pair():
    """real = coordinate image, fake = its negative: equal |values| everywhere means every output pixel of
    fake[i] came from the same source pixel as real[i], or both were filled: same shift AND same cutouts."""
    torch.manual_seed(0)
    real = coordinate_image(64, 4, 32, 32)
    real_aug, fake_aug = PairedAugment(p=1.0)(real, -real)
    assert torch.equal(real_aug, -fake_aug)
    assert (real_aug == 0).any() and (real_aug != 0).any()

    # A constant offset survives wherever the pixel was kept, and the fills line up exactly.
    torch.manual_seed(1)
    x = torch.rand(64, 4, 32, 32) + 1  # no zeros in the input, so 0 in the output is a fill
    real_aug, fake_aug = PairedAugment(p=1.0)(x, x + 3)
    assert torch.equal(real_aug == 0, fake_aug == 0)
    kept = real_aug != 0
    assert torch.allclose((fake_aug - real_aug)[kept], torch.full_like(real_aug[kept], 3.0))


def test_each_sample_gets_its_own_transform():
    torch.manual_seed(0)
    C, H, W = 1, 32, 32
    real = coordinate_image(64, C, H, W)
    real_aug, _ = PairedAugment(p=1.0, cutouts=0)(real, real)
    dy, dx = inferred_shifts(real_aug, C, H, W)
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 20  # at most 100 possible shifts, 64 samples

    erased, _ = PairedAugment(p=1.0, translate=NO_TRANSLATE)(torch.ones(64, 1, H, W), torch.ones(64, 1, H, W))
    masks = (erased == 0).flatten(1)
    assert len({tuple(m.tolist()) for m in masks}) == 64


# ------------------------------------------------------------------------------------------------------------
# Translation


@pytest.mark.parametrize("H, W", [(32, 32), (20, 50)])
def test_translation_is_an_integer_shift_within_range(H, W):
    """Default = Kornia's translate_x = translate_y = (0, 0.3): content moves right / down by
    0..30% of the size. Every output pixel is an exact copy of the input pixel it was shifted from,
    or 0 where nothing was."""
    torch.manual_seed(0)
    C = 2
    real = coordinate_image(400, C, H, W)
    real_aug, _ = PairedAugment(p=1.0, cutouts=0)(real, real)
    dy, dx = inferred_shifts(real_aug, C, H, W)
    assert dy.min() == 0 and dy.max() == math.floor(0.3 * H)
    assert dx.min() == 0 and dx.max() == math.floor(0.3 * W)
    # The zero fill covers exactly the uncovered strip: the top dy rows and left dx columns.
    zeros = (real_aug == 0).flatten(1).sum(1)
    assert torch.equal(zeros, C * (H * W - (H - dy) * (W - dx)))


def test_symmetric_translation_range():
    """A float translate t means shifts in [-t, t] of the size, both directions."""
    torch.manual_seed(0)
    C, H, W = 1, 32, 32
    real = coordinate_image(400, C, H, W)
    real_aug, _ = PairedAugment(p=1.0, translate=0.3, cutouts=0)(real, real)
    dy, dx = inferred_shifts(real_aug, C, H, W)
    assert dy.min() == -9 and dy.max() == 9 and dx.min() == -9 and dx.max() == 9


def test_translate_function_moves_content():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    out = translate(x, torch.tensor([1]), torch.tensor([-2]))  # down 1, left 2
    expected = torch.tensor([[0, 0, 0, 0], [3, 4, 0, 0], [7, 8, 0, 0], [11, 12, 0, 0]], dtype=torch.float32)
    assert torch.equal(out[0, 0], expected)


def test_translation_frequency_matches_p():
    """Each sample is translated with probability p. A drawn shift can be (0, 0) (1 in 10 x 10 on 32 x 32), so
    the visible rate is p * 0.99."""
    torch.manual_seed(0)
    C, H, W, N, p = 1, 32, 32, 4000, 0.4
    real = coordinate_image(N, C, H, W)
    real_aug, _ = PairedAugment(p=p, cutouts=0)(real, real)
    dy, dx = inferred_shifts(real_aug, C, H, W)
    moved = ((dy != 0) | (dx != 0)).double().mean().item()
    assert abs(moved - p * 0.99) < 5 * math.sqrt(p * (1 - p) / N)


# ------------------------------------------------------------------------------------------------------------
# Cutouts


def test_single_cutout_is_one_rectangle_of_10_to_50_percent():
    torch.manual_seed(0)
    N, H, W = 500, 64, 64
    ones = torch.ones(N, 1, H, W)
    out, _ = PairedAugment(p=1.0, translate=NO_TRANSLATE, cutouts=1)(ones, ones)
    erased = out[:, 0] == 0  # (N, H, W)
    rows, cols = erased.any(2), erased.any(1)  # (N, H), (N, W)
    height, width = rows.sum(1), cols.sum(1)
    box = rows.unsqueeze(2) & cols.unsqueeze(1)
    assert torch.equal(erased, box)  # the erased set is exactly a rectangle
    for hit, extent in ((rows, height), (cols, width)):  # the rows (and columns) hit form one run
        first = hit.long().argmax(1)
        last = hit.shape[1] - 1 - hit.flip(1).long().argmax(1)
        assert torch.equal(last - first + 1, extent)
    fraction = (height * width).double() / (H * W)
    rounding = 0.5 * (height + width + 1).double() / (H * W)  # width and height are rounded to whole pixels
    assert (fraction >= 0.1 - rounding).all() and (fraction <= 0.5 + rounding).all()
    assert fraction.min() < 0.12 and fraction.max() > 0.45  # the whole range is used
    assert (height > 2 * width).any() and (width > 2 * height).any()  # tall and wide rectangles


def test_number_of_cutouts_and_their_frequency():
    """With translation off, a sample is untouched only if all its `cutouts` draws failed: (1 - p)^cutouts."""
    torch.manual_seed(0)
    N, H, W, p = 4000, 16, 16, 0.4
    ones = torch.ones(N, 1, H, W)
    for cutouts in (0, 1, 3):
        out, _ = PairedAugment(p=p, translate=NO_TRANSLATE, cutouts=cutouts)(ones, ones)
        untouched = (out != 0).flatten(1).all(1).double().mean().item()
        expected = (1 - p) ** cutouts
        assert abs(untouched - expected) < 5 * math.sqrt(max(expected * (1 - expected), 1e-12) / N) + 1e-12

    # p = 1: three rectangles erase more than one; the union of three never exceeds 3 x 50% of the image.
    one = PairedAugment(p=1.0, translate=NO_TRANSLATE, cutouts=1)(ones, ones)[0]
    three = PairedAugment(p=1.0, translate=NO_TRANSLATE, cutouts=3)(ones, ones)[0]
    erased_one = (one == 0).flatten(1).double().mean(1)
    erased_three = (three == 0).flatten(1).double().mean(1)
    assert erased_three.mean() > erased_one.mean() + 0.15
    assert (erased_three > 0.5 + 0.05).any()  # more than one rectangle's worth


# ------------------------------------------------------------------------------------------------------------
# General contract


@pytest.mark.parametrize("shape, low, high", [((8, 4, 32, 32), -4.0, 4.0), ((8, 3, 64, 64), -1.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_dtype_and_values_kept(shape, low, high, dtype):
    """Latents and pixels: same shape and dtype; every output value is an input value or 0."""
    torch.manual_seed(0)
    real = (torch.rand(shape) * (high - low) + low).to(dtype)
    fake = (torch.rand(shape) * (high - low) + low).to(dtype)
    real_aug, fake_aug = PairedAugment(p=1.0)(real, fake)
    for x, x_aug in ((real, real_aug), (fake, fake_aug)):
        assert x_aug.shape == x.shape and x_aug.dtype == dtype
        allowed = torch.cat([x.flatten(), torch.zeros(1, dtype=dtype)])
        assert torch.isin(x_aug, allowed).all()
        assert not torch.equal(x_aug, x)


def test_mixed_dtypes_keep_their_own():
    """Under autocast the fake can be bfloat16 while the real is float32."""
    torch.manual_seed(0)
    real, fake = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8).bfloat16()
    real_aug, fake_aug = PairedAugment(p=1.0)(real, fake)
    assert real_aug.dtype == torch.float32 and fake_aug.dtype == torch.bfloat16
    assert torch.equal(real_aug == 0, fake_aug == 0)


def test_p0_is_exact_identity_and_draws_nothing():
    real, fake = torch.randn(4, 4, 32, 32), torch.randn(4, 4, 32, 32)
    state = torch.get_rng_state()
    real_aug, fake_aug = PairedAugment(p=0.0)(real, fake)
    assert real_aug is real and fake_aug is fake
    assert torch.equal(torch.get_rng_state(), state)


def test_shapes_must_match():
    with pytest.raises(ValueError):
        PairedAugment()(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 9))


def test_gradient_reaches_fake_exactly_where_pixels_survive():
    """d sum(fake_aug) / d fake = 1 at every input pixel copied into the output, 0 at those
    shifted out or erased."""
    torch.manual_seed(0)
    C, H, W = 4, 16, 16
    real = coordinate_image(16, C, H, W)
    fake = real.clone().requires_grad_(True)
    real_aug, fake_aug = PairedAugment(p=1.0)(real, fake)
    fake_aug.sum().backward()
    channel, row, col, kept = decode(real_aug.detach(), C, H, W)
    source = ((channel * H + row) * W + col).flatten(1)  # (N, C H W) flat source index of each output pixel
    copies = torch.zeros_like(real).flatten(1)  # how many output pixels each input pixel was copied to
    copies.scatter_add_(1, source, kept.flatten(1).double())
    assert torch.equal(fake.grad, copies.view_as(real))
    assert fake.grad.sum() > 0 and (fake.grad == 0).any()


def test_same_seed_same_output():
    x, y = torch.randn(16, 4, 32, 32), torch.randn(16, 4, 32, 32)
    aug = PairedAugment(p=0.4)
    torch.manual_seed(123)
    first = aug(x, y)
    torch.manual_seed(123)
    second = aug(x, y)
    torch.manual_seed(124)
    third = aug(x, y)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], third[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract():
    torch.manual_seed(0)
    real = coordinate_image(32, 4, 32, 32).cuda()
    real_aug, fake_aug = PairedAugment(p=1.0)(real, -real)
    assert real_aug.device == real.device and torch.equal(real_aug, -fake_aug)
    inferred_shifts(PairedAugment(p=1.0, cutouts=0)(real, real)[0].cpu(), 4, 32, 32)
    x = torch.rand(8, 3, 32, 32, device="cuda")
    assert AffineAugment(p=1.0)(x).device == x.device


# ------------------------------------------------------------------------------------------------------------
# AffineAugment


def test_affine_shape_finite_and_reflection_padding():
    """Bilinear sampling with reflection padding only averages input pixels: no zeros enter from outside."""
    torch.manual_seed(0)
    x = torch.rand(32, 4, 32, 32) + 1  # values in [1, 2)
    out = AffineAugment(p=1.0)(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.min() >= 1 - 1e-5 and out.max() <= 2 + 1e-5
    changed = ~torch.isclose(out, x).flatten(1).all(1)
    assert changed.all()


def test_affine_p0_and_identity_parameters():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 24, 40)
    assert AffineAugment(p=0.0)(x) is x
    identity = AffineAugment(p=1.0, degrees=0.0, translate=0.0, scale=(1.0, 1.0))(x)
    assert torch.allclose(identity, x, atol=1e-5)


def test_affine_applied_with_probability_p():
    """Samples not drawn come back bit-identical; the drawn ones change."""
    torch.manual_seed(0)
    N, p = 2000, 0.8
    x = torch.randn(N, 1, 8, 8)
    out = AffineAugment(p=p)(x)
    unchanged = (out == x).flatten(1).all(1).double().mean().item()
    assert abs(unchanged - (1 - p)) < 5 * math.sqrt(p * (1 - p) / N)


def test_affine_theta_geometry():
    """A 90 degree rotation is rot90, also on the central square of a non-square image (no shear from the
    normalized coordinates), an integer shift of (dx, dy) pixels moves the content right by dx and down by dy,
    and a zoom of 2 about the center keeps the central 2 x 2 block's mean."""
    x = torch.randn(2, 3, 8, 8)
    zero, one = torch.zeros(2), torch.ones(2)
    rotated = warp_affine(x, affine_theta(torch.full((2,), math.pi / 2), one, torch.zeros(2, 2), 8, 8))
    assert (torch.allclose(rotated, x.rot90(1, (2, 3)), atol=1e-5)
            or torch.allclose(rotated, x.rot90(-1, (2, 3)), atol=1e-5))
    moved = warp_affine(x, affine_theta(zero, one, torch.tensor([[2.0, 1.0]] * 2), 8, 8))
    assert torch.allclose(moved[..., 1:, 2:], x[..., :-1, :-2], atol=1e-5)
    wide = torch.randn(2, 3, 6, 10)
    rotated = warp_affine(wide, affine_theta(torch.full((2,), math.pi / 2), one, torch.zeros(2, 2), 6, 10))
    square = wide[..., 2:8]  # the central 6 x 6 square maps onto itself
    assert torch.allclose(rotated[..., 2:8], square.rot90(1, (2, 3)), atol=1e-5) or torch.allclose(
        rotated[..., 2:8], square.rot90(-1, (2, 3)), atol=1e-5)
    zoomed = warp_affine(x, affine_theta(zero, 2 * one, torch.zeros(2, 2), 8, 8))
    assert torch.allclose(zoomed[..., 3:5, 3:5].mean((2, 3)), x[..., 3:5, 3:5].mean((2, 3)), atol=1e-5)
