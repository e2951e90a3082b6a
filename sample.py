"""Sampling: K generator steps from noise (t = 1) to data (t = 0), and the command line to run them.

    python sample.py --nfe 1                                  # out/ckpt.pt -> samples.png, a row per class
    python sample.py --labels 3,3,5 --out dresses.png         # chosen classes (Fashion-MNIST: dress, sandal)
    torchrun --nproc_per_node=8 sample.py --ckpt xl2_1nfe_guided_FID2.38.pth --model XL/2 --vae vae.bin \\
        --npz samples.npz --num-samples 50000                 # ADM-format samples for FID, authors' weights

Checkpoints: our ckpt.pt (the generator is rebuilt from its stored constructor arguments, EMA weights by
default), or the authors' released bare generator state dicts, whose conditioning (class only, + source time,
+ target time) is read off their keys; --model, --repeat, --nfe and --pred describe the rest.

The .npz for the ADM evaluation suite: arr_0 is uint8 (N, H, W, 3), class-balanced (sample i has class i mod
num_classes), rounded to nearest, shuffled with a fixed permutation, with the matching `labels`. Sample i
always gets the noise of seed (--seed, i) and is computed in the same batch of --batch-size consecutive
indices, so the file does not depend on the number of processes.
"""

import argparse
import os
import sys
import zipfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoint
import prior
import runtime
import vae
from model import MODELS, Generator


@torch.no_grad()
def sample(generator, noise, labels, nfe=1, pred="x"):
    """Run the generator over the time grid linspace(1, 0, nfe + 1) (eq. 39).

    pred "x": x <- G(x, y, s, t);   pred "v": x <- x - (s - t) G(x, y, s, t).
    A 1-NFE generator ignores the times; a fixed K-step generator reads s; an any-step generator reads s
    and t.
    """
    times = torch.linspace(1, 0, nfe + 1, device=noise.device)
    x = noise
    for s, t in zip(times[:-1], times[1:]):
        s_batch, t_batch = s.expand(x.shape[0]), t.expand(x.shape[0])
        out = generator(x, labels, s_batch, t_batch)
        x = out if pred == "x" else x - (s - t) * out
    return x


# ------------------------------------------------------------------------------------------------------------
# Loading a generator


class SampleError(Exception):
    """Bad input to the sampler; the message is one line."""


def sampling_steps(run, requested, what):
    """The steps to sample a train.py or flow_matching.py checkpoint with: requested, if the generator can
    take it, else what it was trained for. A flow-matching velocity field and an any-step AFM generator take
    any count (defaults: the count its run judged with, and 8); a K-step AFM generator takes K only."""
    trained_nfe = run["config"]["nfe"]
    if run.get("objective") == "flow matching":
        return requested or trained_nfe
    nfe = requested or (8 if trained_nfe == "any" else trained_nfe)
    if trained_nfe != "any" and nfe != trained_nfe:
        raise SampleError(f"{what} holds a generator trained for exactly {trained_nfe} step(s); it cannot "
                          f"sample with --nfe {nfe}")
    return nfe


def load_generator(args):
    """-> (generator in eval mode on CPU, nfe, pred, prior). Ours or the authors' file, checked against --nfe.
    The prior is the flow's noise the run trained with (prior.py); the authors' generators use N(0, I)."""
    state = checkpoint.load(args.ckpt)
    if isinstance(state, dict) and "generator_kwargs" in state:  # a ckpt.pt of train.py or flow_matching.py
        generator = Generator(**state["generator_kwargs"])
        checkpoint.load_weights(generator, state[args.weights], what=f"{args.ckpt} [{args.weights}]")
        nfe = sampling_steps(state, args.nfe, args.ckpt)
        pred = args.pred or state["config"]["pred"]
        return generator.eval(), nfe, pred, prior.from_state(state.get("prior"))

    # The authors' release: a bare state dict. Its keys say which time inputs the generator has.
    if args.model not in MODELS:
        raise SampleError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
    has_t_src = any(k.startswith("t_embedder.") for k in state) and args.repeat == 1
    has_t_tgt = any(k.startswith("t_tgt_embedder.") for k in state)
    nfe = args.nfe or (8 if has_t_tgt else 1)
    if nfe > 1 and not has_t_src:
        raise SampleError(f"{args.ckpt} is a 1-NFE generator (it has no time input); it cannot sample with "
                          f"--nfe {nfe}")
    if nfe == 1 and has_t_src and not has_t_tgt:
        raise SampleError(f"{args.ckpt} has a time embedder: pass the --nfe of a multi-step generator "
                          f"(2 or 4), or --repeat (2 or 4) for a deep 1-NFE one")
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] if "y_embedder.embedding_table.weight" \
        in state else 1000
    generator = Generator(use_t_src=has_t_src, use_t_tgt=has_t_tgt, repeat=args.repeat, input_size=32,
                          in_channels=4, num_classes=num_classes, **MODELS[args.model])
    checkpoint.load_weights(generator, state, what=args.ckpt)
    return generator.eval(), nfe, args.pred or ("v" if has_t_src else "x"), prior.GaussianPrior()


def grid_labels(num_classes, per_class=8, max_classes=10):
    """The labels of a progress grid: a row of per_class samples for each of at most max_classes evenly spaced
    classes."""
    classes = torch.linspace(0, num_classes - 1, min(num_classes, max_classes)).round().long()
    return classes.repeat_interleave(per_class)


def write_grid(images, path, nrow):
    """uint8 (N, H, W, C) images (to_uint8's) -> one PNG, nrow images per row."""
    rows = (len(images) + nrow - 1) // nrow
    N, H, W, C = images.shape
    grid = np.zeros((rows * H, nrow * W, C), dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        grid[(i // nrow) * H:(i // nrow + 1) * H, (i % nrow) * W:(i % nrow + 1) * W] = image
    with runtime.writing(path):
        Image.fromarray(grid).save(path)


def to_uint8(images):
    """[-1, 1] float (N, C, H, W) -> uint8 RGB (N, H, W, 3), rounded to nearest (never floored). One channel
    (MNIST, Fashion-MNIST) is replicated to three, as PNG viewers and the FID Inception expect."""
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def make_decoder(generator, vae_path, device):
    """Latent generators need the SD-VAE to become images (decoded in fp32, as the paper does)."""
    if generator.in_channels != 4:  # pixels: 3 channels, or 1 for grayscale
        return lambda x: x
    if vae_path is None:
        raise SampleError("this generator works in the SD-VAE latent space: pass --vae PATH "
                          "(sd-vae-ft-mse weights) to decode its samples")
    autoencoder = vae.load_vae(vae_path, device)
    return lambda z: autoencoder.decode(z / vae.SCALING_FACTOR)


def sample_images(generator, decode, indices, labels, seed, nfe, pred, device, prior=None):
    """uint8 images for the given global sample indices: the noise of sample i is seeded by (seed, i), then
    mapped through the run's prior (prior.py, on device; None: N(0, I))."""
    shape = (generator.in_channels, generator.input_size, generator.input_size)
    streams = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]
    noise = torch.stack([torch.randn(shape, generator=stream) for stream in streams]).to(device)
    if prior is not None:
        noise = prior(noise)
    x = sample(generator, noise, labels.to(device), nfe=nfe, pred=pred)
    return to_uint8(decode(x))


# ------------------------------------------------------------------------------------------------------------
# ADM-format .npz, streamed so neither the processes nor the assembly hold all N images in memory


def write_progress_grid(ema, noise_prior, args, source, step, device):
    """A training run's progress: an EMA sample grid, a row of 8 per class, with the noise of sample indices
    0, 1, ... (the same at every step), as OUT_DIR/samples_<step>.png."""
    if source.in_channels == 4 and source.autoencoder is None:
        return  # latents without --vae cannot be decoded
    labels = grid_labels(ema.num_classes)
    images = sample_images(ema, source.decode, np.arange(len(labels)), labels, args.seed,
                           8 if args.nfe == "any" else args.nfe, args.pred, device, noise_prior)
    write_grid(images, os.path.join(args.out_dir, f"samples_{step:08d}.png"), nrow=8)


def write_npz(path, parts, labels, order, batch_size, world_size):
    """Assemble the per-rank part files into one .npz with arr_0 (shuffled by `order`) and labels.

    Sample i lives in batch b = i // batch_size, which rank b % world_size computed as its
    (b // world_size)-th batch. The array is written row-chunk by row-chunk straight into the (uncompressed)
    zip member.
    """
    N = len(order)
    H, W, C = parts[0].shape[1:]
    tmp_path = path + ".tmp"
    with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|u1", "fortran_order": False, "shape": (N, H, W, C)})
            for start in range(0, N, 1024):
                rows = []
                for i in order[start:start + 1024]:
                    batch, offset = divmod(int(i), batch_size)
                    rows.append(parts[batch % world_size][(batch // world_size) * batch_size + offset])
                member.write(np.stack(rows).tobytes())
        with archive.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, labels[order].astype(np.int64))
    os.replace(tmp_path, path)


def sample_npz(args, generator, decode, nfe, pred, device, rank, world_size, noise_prior):
    N, num_classes, B = args.num_samples, generator.num_classes, args.batch_size
    labels = np.arange(N) % num_classes  # class-balanced: N / num_classes per class
    batches = list(range(rank, (N + B - 1) // B, world_size))
    H = generator.input_size * (8 if generator.in_channels == 4 else 1)  # SD-VAE latents decode at 8x
    part_path = f"{args.npz}.part{rank}.npy"
    part = np.lib.format.open_memmap(part_path, mode="w+", dtype=np.uint8, shape=(len(batches) * B, H, H, 3))
    for k, batch in enumerate(tqdm(batches, disable=rank != 0, desc="sampling")):
        indices = np.arange(batch * B, min((batch + 1) * B, N))
        images = sample_images(generator, decode, indices, torch.from_numpy(labels[indices]), args.seed, nfe,
                               pred, device, noise_prior)
        part[k * B:k * B + len(indices)] = images.numpy()
    part.flush()
    del part
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        parts = [np.load(f"{args.npz}.part{r}.npy", mmap_mode="r") for r in range(world_size)]
        order = np.random.RandomState(args.seed).permutation(N)  # IS is computed on contiguous chunks
        write_npz(args.npz, parts, labels, order, B, world_size)
        del parts
        for r in range(world_size):
            os.remove(f"{args.npz}.part{r}.npy")
        print(f"wrote {N} samples ({N // num_classes} per class) to {args.npz}")
    if world_size > 1:
        torch.distributed.barrier()


def sample_grid(args, generator, decode, nfe, pred, device, noise_prior):
    if args.labels:
        try:
            labels = [int(c) for c in args.labels.split(",")]
        except ValueError:
            raise SampleError(f"--labels takes comma-separated class numbers, e.g. 3,3,5; got "
                              f"{args.labels!r}") from None
    else:
        labels = grid_labels(generator.num_classes)[:args.num_samples or None].tolist()
    bad = [c for c in labels if not 0 <= c < generator.num_classes]
    if bad:
        raise SampleError(f"--labels {bad[0]} is out of range: this generator has classes "
                          f"0..{generator.num_classes - 1}")
    images = sample_images(generator, decode, np.arange(len(labels)), torch.tensor(labels), args.seed, nfe,
                           pred, device, noise_prior)
    write_grid(images, args.out, nrow=min(len(labels), 8))
    print(f"wrote {len(labels)} samples to {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from an Adversarial Flow Model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="our ckpt.pt, or an authors' generator .pth")
    p.add_argument("--weights", choices=["ema", "G"], default="ema", help="which generator of our ckpt.pt")
    p.add_argument("--nfe", type=int, default=None,
                   help="sampling steps (default: what the model was trained for)")
    p.add_argument("--pred", choices=["x", "v"], default=None,
                   help="default: the checkpoint's, or x for 1 NFE")
    p.add_argument("--model", default="XL/2", help="architecture of an authors' bare state dict")
    p.add_argument("--repeat", type=int, default=1,
                   help="depth repetition of an authors' deep generator (2 or 4)")
    p.add_argument("--vae", default=None, help="sd-vae-ft-mse weights, for latent generators")
    p.add_argument("--labels", default=None, help="comma-separated class labels for the grid, e.g. 3,3,5")
    p.add_argument("--num-samples", type=int, default=None, help="grid size, or N for --npz")
    p.add_argument("--npz", default=None, help="write ADM-format samples here instead of a grid")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (--npz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--device", default=None)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)

    try:
        code = runtime.run(lambda: run(args), args.debug, {(SampleError, checkpoint.CheckpointError): 2})
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if code:
        sys.exit(code)


def run(args):
    if args.nfe is not None and args.nfe < 1:
        raise SampleError(f"--nfe must be a positive number of steps, got {args.nfe}")
    if args.batch_size < 1:
        raise SampleError(f"--batch-size must be positive, got {args.batch_size}")
    rank, world_size, device = runtime.setup_distributed(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the paper's precision
    generator, nfe, pred, noise_prior = load_generator(args)
    generator.to(device)
    noise_prior.to(device)
    decode = make_decoder(generator, args.vae, device)
    if args.npz:
        if not args.num_samples or args.num_samples <= 0:
            raise SampleError("--npz needs --num-samples N > 0")
        sample_npz(args, generator, decode, nfe, pred, device, rank, world_size, noise_prior)
    else:
        sample_grid(args, generator, decode, nfe, pred, device, noise_prior)


if __name__ == "__main__":
    main()
