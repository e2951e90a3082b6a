"""
The Stable Diffusion VAE (KL-f8), for training AFM in latent space on ImageNet.

The paper's ImageNet models never see pixels. Each 256x256 RGB image is compressed by a pretrained variational
autoencoder into a 4x32x32 latent (8x smaller per side), the generator and discriminator work on latents, and
samples are decoded back to pixels at the very end:

    image (N, 3, 256, 256) in [-1, 1]  --encode-->  mean, logvar (N, 4, 32, 32)
                                                    (the posterior is N(mean, exp(logvar)))
    latent = 0.18215 * mean            (the scaling factor gives the latents roughly unit variance)
    image  = decode(latent / 0.18215)  (N, 3, 256, 256), roughly in [-1, 1]

The network is a plain convolutional encoder/decoder:
    encoder: conv_in -> 4 down blocks (2 ResNet blocks each, stride-2 conv between them) -> mid block
             (ResNet, single-head self-attention, ResNet) -> GroupNorm, SiLU, conv_out -> 8 channels
             (mean, logvar)
    decoder: the mirror image, with 3 ResNet blocks per up block and nearest-neighbour 2x upsampling.
Channel widths 128, 256, 512, 512; GroupNorm with 32 groups and eps 1e-6 everywhere; SiLU activations.
1x1 convs `quant_conv` (8->8) and `post_quant_conv` (4->4) sit between the networks and the latent.

Weights: the paper uses `stabilityai/sd-vae-ft-mse` (https://huggingface.co/stabilityai/sd-vae-ft-mse),
file `diffusion_pytorch_model.bin` (or `diffusion_pytorch_model.safetensors`, read when the `safetensors`
package happens to be installed). The authors' repository
https://huggingface.co/ByteDance-Seed/Adversarial-Flow-Models also ships a VAE under `misc/`. The parameter
names here are diffusers' names, so those files load with strict=True. Older diffusers files spell the
attention weights `query/key/value/proj_attn` (sometimes as 1x1 conv kernels); `AutoencoderKL.load_state_dict`
translates them to the current `to_q/to_k/to_v/to_out.0`.

    vae = load_vae("diffusion_pytorch_model.bin", "cuda")
    mean, logvar = vae.encode(images)                  # images in [-1, 1]
    pixels = vae.decode(latents / SCALING_FACTOR)

One-time latent extraction, so that training never runs the encoder:

    python vae.py --weights diffusion_pytorch_model.bin --data-path /data/imagenet/train --out latents.npy

encodes every image of an image folder (root/<class>/<image>), unflipped and horizontally flipped, into ONE
`.npy` file (np.load(path, mmap_mode="r") reads it without loading it into memory). It holds a numpy
structured array of N records, one per image, in the order of data.ImageFolder:

    dtype [("latent", "<f2", (2, 4, S/8, S/8)), ("label", "<i8")]
    latent[i, 0] = 0.18215 * posterior mean of image i, latent[i, 1] = the same for its horizontal flip
    label[i]     = index of the image's class folder among the sorted class folder names

At 256 px that is 16,392 bytes per image, about 21 GB for ImageNet's 1.28M training images.
"""

import argparse
import contextlib
import dataclasses
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import runtime
from model import MODELS

SCALING_FACTOR = 0.18215  # latent = SCALING_FACTOR * posterior mean (sd-vae-ft-mse)

BLOCK_CHANNELS = (128, 256, 512, 512)  # widths of the four resolutions, full resolution first
LAYERS_PER_BLOCK = 2  # ResNet blocks per encoder resolution (the decoder has one more)
LATENT_CHANNELS = 4
GROUPS = 32  # GroupNorm groups
EPS = 1e-6  # GroupNorm eps


class VAEError(Exception):
    """A VAE weights file or a latent extraction that cannot work; the message says why."""


def group_norm(channels):
    return nn.GroupNorm(GROUPS, channels, eps=EPS)


# -----------------------------------------------------------------------------
# Building blocks


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1 conv when the width changes) skip connection."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):  # (N, in, H, W) -> (N, out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels):
        super().__init__()
        self.group_norm = group_norm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list for diffusers' name "to_out.0"

    def forward(self, x):  # (N, C, H, W) -> (N, C, H, W)
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, H*W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (N, 1 head, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v: (N, H*W, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution, the only place where distant pixels
    interact."""

    def __init__(self, channels):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels), ResnetBlock(channels, channels)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; the input is padded on the right and bottom only, so H and W halve exactly."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):  # (N, C, H, W) -> (N, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (N, C, H, W) -> (N, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResolutionBlock(nn.Module):
    """ResNet blocks at one resolution, then a resampler stored under diffusers' name for it (or none)."""

    def __init__(self, in_channels, out_channels, layers, resampler, name):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList([ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.name = name
        setattr(self, name, nn.ModuleList([resampler(out_channels)]) if resampler else None)

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        resamplers = getattr(self, self.name)
        return x if resamplers is None else resamplers[0](x)


class EncoderBlock(ResolutionBlock):
    def __init__(self, in_channels, out_channels, downsample):
        super().__init__(in_channels, out_channels, LAYERS_PER_BLOCK, downsample and Downsample,
                         "downsamplers")


class DecoderBlock(ResolutionBlock):
    def __init__(self, in_channels, out_channels, upsample):
        super().__init__(in_channels, out_channels, LAYERS_PER_BLOCK + 1, upsample and Upsample, "upsamplers")


# -----------------------------------------------------------------------------
# Encoder, decoder, and the autoencoder


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        widths = BLOCK_CHANNELS  # 128, 256, 512, 512
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                EncoderBlock(widths[max(i - 1, 0)], widths[i], downsample=i < len(widths) - 1)
                for i in range(len(widths))
            ]
        )
        self.mid_block = MidBlock(widths[-1])
        self.conv_norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * LATENT_CHANNELS, 3, padding=1)

    def forward(self, x):  # (N, 3, H, W) -> (N, 8, H/8, W/8)
        x = self.conv_in(x)  # (N, 128, H, W)
        for block in self.down_blocks:
            x = block(x)  # 128 @ H/2, 256 @ H/4, 512 @ H/8, 512 @ H/8
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        widths = BLOCK_CHANNELS[::-1]  # 512, 512, 256, 128
        self.conv_in = nn.Conv2d(LATENT_CHANNELS, widths[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(
            [DecoderBlock(widths[max(i - 1, 0)], widths[i], upsample=i < len(widths) - 1)
             for i in range(len(widths))]
        )
        self.mid_block = MidBlock(widths[0])
        self.conv_norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):  # (N, 4, h, w) -> (N, 3, 8h, 8w)
        x = self.conv_in(z)  # (N, 512, h, w)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)  # 512 @ 2h, 512 @ 4h, 256 @ 8h, 128 @ 8h
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# legacy diffusers attention names -> current ones
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_legacy_keys(state_dict):
    """Rename `...attentions.0.{query,key,value,proj_attn}.*` to `...{to_q,to_k,to_v,to_out.0}.*`.

    Some old files store these projections as 1x1 conv kernels (C, C, 1, 1); they become (C, C) linear
    weights. Keys in the current spelling pass through unchanged.
    """
    converted = {}
    for name, tensor in state_dict.items():
        module, _, param = name.rpartition(".")  # "encoder.mid_block.attentions.0.query", "weight"
        parent, _, leaf = module.rpartition(".")  # "encoder.mid_block.attentions.0", "query"
        if ".attentions." in name and leaf in LEGACY_ATTENTION_NAMES:
            name = f"{parent}.{LEGACY_ATTENTION_NAMES[leaf]}.{param}"
            if tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        converted[name] = tensor
    return converted


class AutoencoderKL(nn.Module):
    """The sd-vae-ft-mse VAE with diffusers' parameter names."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.quant_conv = nn.Conv2d(2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)
        self.post_quant_conv = nn.Conv2d(LATENT_CHANNELS, LATENT_CHANNELS, 1)

    def encode(self, x):  # x: (N, 3, H, W) in [-1, 1] -> mean, logvar: (N, 4, H/8, W/8)
        moments = self.quant_conv(self.encoder(x))  # (N, 8, H/8, W/8)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the clamp of diffusers' DiagonalGaussianDistribution

    def decode(self, z):  # z: (N, 4, h, w), unscaled latents -> (N, 3, 8h, 8w), roughly in [-1, 1]
        return self.decoder(self.post_quant_conv(z))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load a diffusers AutoencoderKL state dict, in the current or the legacy attention spelling.

        With strict=True, a missing, unexpected or wrongly shaped key raises VAEError naming the first one.
        """
        state_dict = convert_legacy_keys(state_dict)
        if strict:
            check_state_dict(self.state_dict(), state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def check_state_dict(expected, got):
    """Raise VAEError naming the first key that is missing or wrongly shaped in `got`, or else unexpected in
    it."""
    mismatch = checkpoint.first_mismatch(expected, got)
    if mismatch is not None:
        raise VAEError(f"{mismatch} (expected a diffusers AutoencoderKL state dict of "
                       f"stabilityai/sd-vae-ft-mse)")


def load_vae(path, device="cpu"):
    """Read a diffusers VAE weights file (.bin/.pth/.pt, or .safetensors) into an AutoencoderKL in eval
    mode."""
    if not os.path.isfile(path):
        raise VAEError(f"VAE weights file not found: {path} (download diffusion_pytorch_model.bin from "
                       "https://huggingface.co/stabilityai/sd-vae-ft-mse)")
    if path.endswith(".safetensors"):
        try:  # optional package: only .safetensors files need it
            from safetensors.torch import load_file
        except ImportError:
            raise VAEError(
                f"{path}: reading .safetensors needs the `safetensors` package (pip install safetensors), "
                "or use diffusion_pytorch_model.bin instead"
            ) from None
        state_dict = load_file(path)
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line),
                          str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise VAEError(f"{path}: cannot read it as a torch state dict ({reason})") from None
    if not isinstance(state_dict, dict):
        raise VAEError(f"{path}: expected a state dict, found a {type(state_dict).__name__}")
    vae = AutoencoderKL()
    try:
        vae.load_state_dict(state_dict)
    except VAEError as e:
        raise VAEError(f"{path}: {e}") from None
    return vae.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# One-time latent extraction: an image folder -> one .npy of (both flips' latents, label) records


class BothFlips(torch.utils.data.Dataset):
    """Image i, unflipped and flipped: ((2, 3, S, S) uint8, label)."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, index):
        image, label = self.folder[(index, False)]
        flipped, _ = self.folder[(index, True)]
        return torch.stack([image, flipped]), label


@torch.no_grad()
def encode_latents(autoencoder, images):
    """[-1, 1] images (N, 3, 256, 256) -> scaled SD-VAE latents (N, 4, 32, 32): a posterior sample, encoded in
    bf16 on CUDA (as the authors do) and fp32 elsewhere."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        mean, logvar = autoencoder.encode(images)
    mean, logvar = mean.float(), logvar.float()
    return SCALING_FACTOR * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))


@dataclasses.dataclass
class TrainingData:
    """What the networks of train.py and classifier.py train on: the resumable loader, and
    next_batch() -> (x, y) as the networks see them."""
    loader: data.Loader
    next_batch: object
    size: int             # training samples
    num_classes: int
    in_channels: int      # of the networks' input: 4 for SD-VAE latents
    input_size: int
    autoencoder: object   # the SD-VAE of --vae, or None

    def decode(self, x):
        """The networks' space -> [-1, 1] pixels; None for latents without --vae."""
        if self.in_channels != 4:
            return x
        return self.autoencoder.decode(x / SCALING_FACTOR) if self.autoencoder is not None else None


def open_data(args, rank, world_size, device, flip=True, decoder=False):
    """The --data source as batches of --batch-size / world_size per rank, checked to fit --model's patches.
    Rank 0 reads (or downloads) it first. An ImageNet image folder is encoded on the fly into SD-VAE latents;
    decoder=True also loads --vae to decode latents that were extracted beforehand."""
    if world_size > 1 and rank > 0:
        dist.barrier()  # rank 0 first, so that only it downloads
    dataset, num_classes, in_channels, input_size = data.make_dataset(args.data, args.data_path,
                                                                      args.image_size)
    if world_size > 1 and rank == 0:
        dist.barrier()
    encode = args.data == "imagenet" and in_channels == 3
    if encode and not args.vae:
        raise data.DataError("--data imagenet with an image folder needs --vae (sd-vae-ft-mse weights), or "
                             "latents extracted once with `python vae.py`")
    wanted = args.vae and (encode or decoder)
    autoencoder = load_vae(args.vae, device).requires_grad_(False) if wanted else None
    if encode:
        in_channels, input_size = 4, input_size // 8
    patch = MODELS[args.model]["patch_size"]
    if input_size % patch:
        raise data.DataError(f"{args.model} cuts its input into {patch} x {patch} patches, which do not tile "
                             f"{input_size} x {input_size}: choose another --model or --image-size")
    workers = data.default_workers(dataset) if args.num_workers is None else args.num_workers
    loader = data.Loader(dataset, args.batch_size // world_size, rank=rank, world_size=world_size,
                         seed=args.seed, num_workers=workers, device=device, flip=flip)

    def next_batch():
        x, y = next(loader)
        return (encode_latents(autoencoder, x) if encode else x), y

    return TrainingData(loader, next_batch, len(dataset), num_classes, in_channels, input_size, autoencoder)


def extract_latents(weights, data_path, out, image_size=256, batch_size=64, device=None, workers=4):
    """Encode every image of `data_path` (root/<class>/<image>) with both flips into the .npy file `out`.

    The file format is described in the module docstring. It is written to `out + ".tmp"` and renamed at the
    end, so `out` is either absent or complete.
    """
    if image_size % 8:
        raise VAEError(f"--image-size must be a multiple of 8, got {image_size}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise VAEError(f"the directory of --out {out} does not exist")
    device = torch.device(device or runtime.default_device())
    vae = load_vae(weights, device)

    # RGB, as the VAE needs; raises data.DataError for a missing or empty folder
    folder = data.ImageFolder(data_path, image_size, channels=3)
    # bf16 on CUDA (as the latents are stored in fp16 anyway), fp32 elsewhere
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    side = image_size // 8
    record = np.dtype([("latent", "<f2", (2, LATENT_CHANNELS, side, side)), ("label", "<i8")])
    loader = torch.utils.data.DataLoader(
        BothFlips(folder), batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    tmp = out + ".tmp"
    try:
        records = np.lib.format.open_memmap(tmp, mode="w+", dtype=record, shape=(len(folder),))
        start = 0
        for images, labels in tqdm(loader, desc="encoding", unit="batch"):
            # images: (B, 2, 3, S, S) uint8 -> (2B, 3, S, S) in [-1, 1]
            x = images.flatten(0, 1).to(device, non_blocking=True).float() / 127.5 - 1.0
            with torch.inference_mode(), autocast:
                mean, _ = vae.encode(x)  # (2B, 4, S/8, S/8)
            latents = (SCALING_FACTOR * mean.float()).unflatten(0, (-1, 2))  # (B, 2, 4, S/8, S/8)
            if not torch.isfinite(latents).all():
                raise VAEError(f"non-finite latents in images {start}..{start + len(labels) - 1}")
            records["latent"][start : start + len(labels)] = latents.cpu().numpy()
            records["label"][start : start + len(labels)] = labels.numpy()
            start += len(labels)
        records.flush()
        del records
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {start} images ({len(folder.classes)} classes) to {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Encode an image folder into sd-vae-ft-mse latents (both flips).")
    parser.add_argument("--weights", required=True,
                        help="diffusers VAE weights, e.g. diffusion_pytorch_model.bin")
    parser.add_argument("--data-path", required=True,
                        help="image folder root/<class>/<image>, e.g. ImageNet train")
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="data loader processes")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    def extract():
        return extract_latents(args.weights, args.data_path, args.out, args.image_size, args.batch_size,
                               args.device, args.workers)

    return runtime.run(extract, args.debug, {Exception: 2})


if __name__ == "__main__":
    sys.exit(main())
