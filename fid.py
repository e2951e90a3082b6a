"""
Frechet Inception Distance (FID), self-contained: the FID Inception network, its input pipelines, streamed
feature statistics, the Frechet distance and a command line.

FID compares two image sets through the 2048-d pool features of an Inception-v3 network. Fit one
Gaussian to each set's features (mean mu, covariance sigma), then take the Frechet (2-Wasserstein)
distance between the Gaussians:

    FID = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr( (sigma1 sigma2)^(1/2) )

Published FIDs all use one network: the TensorFlow Inception graph of 2015-12-05 that the original FID code
shipped. Its PyTorch port is pytorch-fid's release file pt_inception-2015-12-05-6726825d.pth, which this file
loads unchanged. The port differs from torchvision's Inception-v3 in two places: the average pools in the A, C
and E blocks ignore the zero padding, and the last E block max-pools in its pool branch.

The network sees 299x299 inputs. Two resize pipelines are in use, and they give slightly different FIDs:
- resize="tf1" (default): TensorFlow 1's bilinear resize (no half-pixel offset) on [0, 255] values, then
  (x - 128) / 128. This is what the original TF code, ADM's evaluation suite and torch-fidelity compute.
- resize="pytorch": x / 255, torch's bilinear interpolate (half-pixel centers), then 2x - 1. This is
  pytorch-fid.

Usage:
    python fid.py samples.npz reference.npz          # FID between two sets; prints "FID <value>"
    python fid.py samples/ reference_stats.npz       # image folders and precomputed mu/sigma files work too
    python fid.py --stats cifar10_stats.npz cifar10  # write mu/sigma of a set (here: CIFAR-10's training set)

A set is an .npz with arr_0 = uint8 (N, H, W, 3) (ADM's sample format), an .npz holding precomputed mu and
sigma, or a folder of images (searched recursively). The weights download once to ~/.cache/afm/, checked
by SHA-256 (set AFM_FID_WEIGHTS to put them elsewhere); --weights PATH uses a file you already have,
checked by its keys and shapes.
"""

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import checkpoint
import data
import runtime

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
# SHA-256 of that file (95,628,359 bytes); its first 8 hex digits are the "6726825d" in the name (torch.hub's
# habit).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FEATURE_DIM = 2048
TRAINING_SETS = ("cifar10", "mnist", "fashion-mnist")  # sources named by dataset instead of by path


class FidError(Exception):
    """A problem with the user's input or weights, reported as one line by the command line."""


# ------------------------------------------------------------------------------------------------------------
# The two input pipelines: resize any image to 299x299, then scale to [-1, 1].

def resize_bilinear_tf1(x, size):
    """TensorFlow 1's tf.image.resize_bilinear(align_corners=False): x (N, C, H, W) float -> (N, C, size,
    size).

    Output pixel i reads source coordinate i * (in / out), with no half-pixel offset (so the image shifts
    slightly toward the top-left), and blends the two neighbours floor(coord) and floor(coord) + 1 (clamped to
    the last pixel). Coordinates are float32 as in TF. Blend along the width first, then along the height.
    """
    def neighbours(n_in):
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        coord = torch.arange(size, dtype=torch.float32, device=x.device) * scale
        lo = coord.long()                                 # floor, as coord >= 0
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (coord - lo).to(x.dtype)           # frac in [0, 1)

    y_lo, y_hi, y_frac = neighbours(x.shape[2])
    x_lo, x_hi, x_frac = neighbours(x.shape[3])
    top, bottom = x[:, :, y_lo, :], x[:, :, y_hi, :]      # (N, C, size, W)
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * x_frac                    # (N, C, size, size)
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * x_frac
    return top + (bottom - top) * y_frac[:, None]


def preprocess(images, resize):
    """images: (N, 3, H, W) uint8, or float in [0, 255] -> (N, 3, 299, 299) float32 in [-1, 1]."""
    x = images.float()
    if resize == "tf1":
        return (resize_bilinear_tf1(x, 299) - 128) / 128
    x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


# ------------------------------------------------------------------------------------------------------------
# The FID Inception network. Module names follow the weight file's keys
# ("Mixed_5b.branch1x1.conv.weight", ...).

class ConvBN(nn.Module):
    """The unit every Inception layer is built from: conv (no bias) -> batch norm (eps 1e-3) -> ReLU."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    # Average over the valid pixels only: at the border the zero padding is not counted (the FID variant).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d at 35x35: four parallel branches (1x1, 5x5, double 3x3, pool), concatenated on
    channels."""

    def __init__(self, c_in, pool_channels):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_channels, 1)

    def forward(self, x):  # (N, c_in, 35, 35) -> (N, 224 + pool_channels, 35, 35)
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17 with strided convs beside a max pool."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):  # (N, 288, 35, 35) -> (N, 768, 17, 17)
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b..6e at 17x17: 7x7 convolutions factored into 1x7 and 7x1, with c7 channels inside the
    branches."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):  # (N, 768, 17, 17) -> (N, 768, 17, 17)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(avg_pool_3x3(x))], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):  # (N, 768, 17, 17) -> (N, 1280, 8, 8)
        b7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7x3 = layer(b7x3)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7x3, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b/7c at 8x8: the 3x3 branches split into parallel 1x3 and 3x1 convs. pool: "avg" (7b) or "max"
    (7c)."""

    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):  # (N, c_in, 8, 8) -> (N, 2048, 8, 8)
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ], dim=1)


class InceptionV3(nn.Module):
    """The FID Inception: images -> (N, 2048) pool features. resize: "tf1" (ADM, torch-fidelity) or
    "pytorch"."""

    def __init__(self, resize="tf1"):
        super().__init__()
        if resize not in ("tf1", "pytorch"):
            raise ValueError(f"resize must be 'tf1' or 'pytorch', not {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_channels=32)
        self.Mixed_5c = InceptionA(256, pool_channels=64)
        self.Mixed_5d = InceptionA(288, pool_channels=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # the 1008-way classifier: in the weight file, unused for FID

    def forward(self, images):
        """images: (N, 3, H, W) uint8, or float in [0, 255], any H and W -> (N, 2048) float32 features."""
        x = preprocess(images, self.resize)                                        # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))       # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                           # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                              # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                           # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                         # (N, 288, 35, 35)
        x = self.Mixed_6a(x)                                                       # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))          # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                         # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                                  # (N, 2048)


# ------------------------------------------------------------------------------------------------------------
# Weights: download once (resumable, checksummed), then load with a key check.

def default_weights_path():
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "afm" / Path(WEIGHTS_URL).name
    return Path(os.environ.get("AFM_FID_WEIGHTS", cache))


def download(url, path, sha256):
    """data.download (resumable, checked, atomic), with its errors as FidError."""
    try:
        data.download(url, os.fspath(path), sha256=sha256)
    except data.DataError as e:
        raise FidError(f"{e} (or pass --weights PATH)") from None


def load_inception(weights=None, resize="tf1", device="cpu"):
    """The FID Inception in eval mode on device.

    weights=None uses the default file (downloaded and SHA-256-checked on first use). An explicit
    weights path is taken as given, so converted or re-saved copies work too; either way the keys and
    shapes must match exactly.
    """
    if weights is None:
        weights = default_weights_path()
        if not weights.exists():
            download(WEIGHTS_URL, weights, WEIGHTS_SHA256)
    model = InceptionV3(resize=resize)
    try:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # missing file, not a torch file, pickled code, ...
        raise FidError(f"could not load FID Inception weights from {weights}: {e}".splitlines()[0]) from e
    found = state_dict if isinstance(state_dict, dict) else {}
    missing, reshaped, unexpected = checkpoint.mismatches(model.state_dict(), found)
    if missing or reshaped or unexpected:
        raise FidError(f"{weights} is not the FID Inception ({WEIGHTS_URL.rsplit('/', 1)[1]}): "
                       f"{len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected keys "
                       f"{unexpected[:2]}, {len(reshaped)} wrong shapes {reshaped[:2]}")
    model.load_state_dict(state_dict)
    return model.eval().requires_grad_(False).to(device)


# ------------------------------------------------------------------------------------------------------------
# Statistics: mean and covariance of the features, accumulated batch by batch in float64.

class FeatureStatistics:
    """Running sums of x and x x^T, so memory stays at D + D^2 floats however many images are seen."""

    def __init__(self, dim=FEATURE_DIM, device="cpu"):
        device = torch.device(device)
        device = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)             # (D,)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (D, D)

    def update(self, features):  # features: (N, D)
        x = features.to(self.sum.device, torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x

    def mean_and_covariance(self):
        """-> mu (D,), sigma (D, D) as float64 numpy; sigma is the unbiased (N - 1) covariance, like
        np.cov."""
        if self.count < 2:
            raise FidError(f"need at least 2 images for a covariance, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.sum_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


@torch.inference_mode()
def compute_statistics(batches, model, device, total=None):
    """batches: iterable of uint8 (N, H, W, 3) arrays or tensors -> mu (2048,), sigma (2048, 2048) float64."""
    stats = FeatureStatistics(device=device)
    for batch in tqdm(batches, total=total, unit="batch", desc="FID features", leave=False):
        images = torch.as_tensor(batch).to(device).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        stats.update(model(images))
    return stats.mean_and_covariance()


# ------------------------------------------------------------------------------------------------------------
# Image sources: .npz files (images or precomputed statistics), image folders, CIFAR-10.

def iterate_array(images, batch_size):
    """An in-memory uint8 (N, H, W, 3) array in batches."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def read_images_header(f, path):
    """Read and check the .npy header of arr_0 from its open zip member f -> shape (N, H, W, 3)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        read_header = np.lib.format.read_array_header_1_0
    else:
        read_header = np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
        raise FidError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {shape}")
    return shape


def iterate_npz(path, batch_size):
    """arr_0 of an .npz in batches of uint8 (n, H, W, 3), read straight from the zip so it is never all in
    memory."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        shape = read_images_header(f, path)
        for start in range(0, shape[0], batch_size):
            batch = np.empty((min(batch_size, shape[0] - start), *shape[1:]), np.uint8)
            if f.readinto(memoryview(batch).cast("B")) != batch.nbytes:
                raise FidError(f"{path}: arr_0 is truncated")
            yield batch


def iterate_folder(paths, batch_size):
    """Image files in batches of uint8 (n, H, W, 3); a batch ends early where the image size changes."""
    batch = []
    for path in paths:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except OSError as e:
            print(f"warning: skipping unreadable image {path} ({e})", file=sys.stderr)
            continue
        if batch and (len(batch) == batch_size or array.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(array)
    if batch:
        yield np.stack(batch)


def load_training_set(name, root):
    """The training images of cifar10, mnist or fashion-mnist as uint8 (N, S, S, 3): S = 32 for CIFAR-10 and
    28 for the MNISTs, whose gray levels are replicated to RGB, as sample.py writes them."""
    try:
        if name == "cifar10":
            return data.load_cifar10(root or "./data")[0]  # uint8 (50000, 32, 32, 3)
        images, _ = data.load_idx_dataset(name, data.find_idx_folder(name, root))  # uint8 (60000, 28, 28)
    except data.DataError as e:  # e.g. offline and not downloaded yet: one line, like our own errors
        raise FidError(str(e)) from e
    return np.repeat(images[..., None], 3, axis=3)


def source_statistics(source, get_model, batch_size, device, data_root=None):
    """mu, sigma of a source: an .npz (arr_0 images, or mu/sigma), an image folder, or the name of a training
    set ("cifar10", "mnist", "fashion-mnist"; data_root None: where train.py looks)."""
    path = Path(source)
    if source in TRAINING_SETS and not path.exists():
        images = load_training_set(source, data_root)
        batches, total = iterate_array(images, batch_size), -(-len(images) // batch_size)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.suffix.lower() in data.IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise FidError(f"{path}: no images found (looked for {', '.join(data.IMAGE_EXTENSIONS)})")
        batches, total = iterate_folder(files, batch_size), None
    elif path.suffix == ".npz":
        with np.load(path) as npz:
            if "mu" in npz.files and "sigma" in npz.files:  # precomputed statistics
                return npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
            if "arr_0" not in npz.files:
                raise FidError(f"{path}: has neither arr_0 (uint8 images) nor mu and sigma; "
                               f"keys are {npz.files}")
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
            count = read_images_header(f, path)[0]  # checked now, before the network is loaded
        batches, total = iterate_npz(path, batch_size), -(-count // batch_size)
    else:
        raise FidError(f"{source}: not an .npz file, an image folder or one of {', '.join(TRAINING_SETS)}")
    return compute_statistics(batches, get_model(), device, total=total)


# ------------------------------------------------------------------------------------------------------------
# The Frechet distance between two Gaussians.

def sqrtm_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (negative noise
    clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64.

    sigma1 sigma2 is not symmetric, but it is similar to sqrt(sigma1) sigma2 sqrt(sigma1), which is
    symmetric PSD and has the same eigenvalues. So tr((sigma1 sigma2)^(1/2)) = sum of the square roots of
    that matrix's eigenvalues.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise FidError(f"statistics do not match: mu {mu1.shape}, {mu2.shape}; "
                       f"sigma {sigma1.shape}, {sigma2.shape}")
    root1 = sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt_product = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


# ------------------------------------------------------------------------------------------------------------
# Command line.

def main(argv=None):
    parser = argparse.ArgumentParser(description="FID between two image sets, or the statistics of one.")
    parser.add_argument("sources", nargs="+", help="two sets (or one with --stats): .npz, image folder, or a "
                                                    "training set: cifar10, mnist, fashion-mnist")
    parser.add_argument("--stats", metavar="OUT.npz", help="write mu and sigma of the one source to OUT.npz")
    parser.add_argument("--weights", type=Path,
                        help="FID Inception weights file (default: download, see above)")
    parser.add_argument("--resize", choices=["tf1", "pytorch"], default="tf1",
                        help="tf1: ADM / torch-fidelity numbers (default); pytorch: pytorch-fid numbers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=runtime.default_device())
    parser.add_argument("--data-root", default=None, help="where a training-set source lives (default: where "
                                                          "train.py looks: ./data, ./data/<name>, ...)")
    parser.add_argument("--debug", action="store_true", help="show the traceback on errors")
    args = parser.parse_args(argv)
    if len(args.sources) != (1 if args.stats else 2):
        parser.error("give two sources, or one source with --stats OUT.npz")

    model = None

    def get_model():  # loaded on first use: two files of precomputed statistics need no network
        nonlocal model
        if model is None:
            model = load_inception(args.weights, args.resize, args.device)
        return model

    def run():
        stats = [source_statistics(source, get_model, args.batch_size, args.device, args.data_root)
                 for source in args.sources]
        if args.stats:
            mu, sigma = stats[0]
            np.savez(args.stats, mu=mu, sigma=sigma)
            print(f"wrote {args.stats}: mu {mu.shape}, sigma {sigma.shape}")
        else:
            print(f"FID {frechet_distance(*stats[0], *stats[1]):.8g}")

    code = runtime.run(run, args.debug, {(FidError, OSError, ValueError, zipfile.BadZipFile): 2})
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
