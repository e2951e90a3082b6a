"""Benchmark one AFM training iteration: the code train.py runs, timed on synthetic data.

    python bench.py --model S/4 --image-size 32 --in-channels 3 --num-classes 10 --batch-size 8 --steps 5 \\
        --device cpu --baseline                      # this repository's step vs the authors' step, same run
    python bench.py --model XL/2 --image-size 32 --in-channels 4 --num-classes 1000 --batch-size 32 --compile
    python bench.py --model T/4 --data-loader        # include loading real files with data.Loader

What is timed. The arguments are parsed by train.parse_args (every train.py flag works here: --model,
--batch-size, --nfe, --repeat, --precision, --compile, --num-workers, ...), the networks are built by
train.build_nets, and one iteration is train.train_step: one D update plus one G update, each on its own batch
of --batch-size images, exactly as in train.py's loop. The input batches are random tensors created on the
device once, before the loop; with --data-loader each iteration instead pulls both batches from a data.Loader
over a small dataset written to a temporary directory (PNG class folders, SD-VAE latents in a .npy, or PNGs
encoded on the fly by --vae), as train.py does. After --warmup iterations, --steps iterations are timed one by
one (with torch.cuda.synchronize around each on CUDA).

How to read the last line (JSON):
    iter_ms          median wall time of one iteration (D update + G update)
    img_per_s        batch / iteration time: generated images per second (D sees another batch per iteration)
    gflop_per_iter   FLOPs of one iteration, counted once by torch.utils.flop_counter.FlopCounterMode, outside
                     the timed loop: matmuls, convolutions and attention, forward and backward; elementwise
                     work, the optimizers, the EMA and a --vae encoder are not counted
    flop_units       gflop_per_iter in units of one G forward on one batch. The paper's accounting (Table 12)
                     is 14.5: G + 2.5 D forward and 2 x 2.5 D backward in the D update, G + 2 D forward,
                     2 G + 1 D backward in the G update
    gflops, tflops   achieved rate: gflop_per_iter / iter_ms
    mm_fp32_gflops   this machine's rate on a 2048 x 2048 fp32 torch.mm (median of 3), and mm_fraction the
                     achieved rate as a fraction of it. Small models on a CPU are bound by per-op overhead,
                     not by matmuls: expect small fractions there
    mfu              CUDA only: tflops over the 8192 x 8192 torch.mm rate of the chosen --precision
                     (mm_fp32_tflops, mm_tf32_tflops, mm_bf16_tflops)
    peak_mem_mb      CUDA: max allocated memory in the timed iterations; CPU: the process's peak RSS
                     (ru_maxrss)
    warmup_s         wall time of the --warmup iterations (with --compile: mostly compilation)
    sample_ms        median time for one batch of samples from the EMA generator (sample.sample), sample_nfe
                     steps
    --baseline:      baseline_iter_ms, baseline_img_per_s, baseline_gflop_per_iter, baseline_flop_units,
                     baseline_tflops, baseline_peak_mem_mb (and on CUDA baseline_mfu) for the authors'
                     training step (authors_step.py), timed the same way after ours, and
                     ratio = iter_ms / baseline_iter_ms: below 1, ours is faster (the project's goal is
                     <= 0.85)

On a shared machine compare numbers from one run only, and repeat runs: each is a median of --steps
iterations. load_avg (the 1-minute load average at the end) says how busy the machine was. On a CPU busier
than its core count, run with OMP_NUM_THREADS=1: spinning OpenMP workers that lose their core can make
a step 10-50x slower.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import authors_step
import checkpoint
import config
import data
import losses
import recipe
import runtime
import train
import vae
from sample import sample


def parse_args(argv=None):
    """-> (bench.py's options, train.py's args). Flags bench.py does not know go to train.parse_args."""
    p = argparse.ArgumentParser(
        description="Time train.py's training iteration. Unknown flags are train.py's (--model, "
                    "--batch-size, --nfe, --repeat, --precision, --compile, --device, --num-workers, --vae, "
                    "...).",
        allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--in-channels", type=int, default=3,
                   help="channels the networks see (3 pixels, 4 latents)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--baseline", action="store_true",
                   help="also time the authors' training step, and the ratio")
    p.add_argument("--data-loader", action="store_true",
                   help="pull batches from data.Loader over files in a temporary directory, as train.py does")
    options, train_argv = p.parse_known_args(argv)
    args = train.parse_args(train_argv)
    if options.data_loader and options.in_channels == 4 and args.num_workers is None:
        # The workers train.py gives ImageNet latents (the default --data, in memory, has none); image
        # folders get data.default_workers, as in train.py.
        args.num_workers = config.DATA["imagenet"]["num_workers"]
    if options.steps < 1 or options.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.vae and not (options.data_loader and options.in_channels == 4):
        p.error("--vae (encoding images on the fly) needs --data-loader and --in-channels 4")
    if options.data_loader and options.in_channels not in (3, 4):
        p.error("--data-loader writes PNG images (--in-channels 3) or latents (--in-channels 4)")
    return options, args


# ------------------------------------------------------------------------------------------------------------
# Timing and counting


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_ms(fn, repeats, device):
    """Median wall time of fn() in milliseconds, each call timed on its own with the device synchronized."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# On CPU, F.scaled_dot_product_attention runs a kernel that FlopCounterMode has no formula for: give it the
# formula of the GPU attention kernels, so attention counts on every device.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs:
            flop_counter.sdpa_backward_flop_count(grad, q, k, v),
}


def count_flops(fn):
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(n, dtype, device):
    """FLOP/s of an n x n @ n x n torch.mm: the median of 3 (10 on CUDA) after one untimed call."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    return 2 * n**3 / (median_ms(lambda: torch.mm(a, b), 10 if device.type == "cuda" else 3, device) / 1e3)


def matmul_peaks(device):
    """The machine's matmul rates: fp32 2048^2 everywhere; on CUDA also the 8192^2 peaks of each --precision.
    Run before train.set_precision, which then sets the TF32 switches for training."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rates = {"mm_fp32_gflops": matmul_rate(2048, torch.float32, device) / 1e9}
    if device.type == "cuda":
        rates["mm_fp32_tflops"] = matmul_rate(8192, torch.float32, device) / 1e12
        torch.backends.cuda.matmul.allow_tf32 = True
        rates["mm_tf32_tflops"] = matmul_rate(8192, torch.float32, device) / 1e12
        rates["mm_bf16_tflops"] = matmul_rate(8192, torch.bfloat16, device) / 1e12
    return rates


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if platform.system() == "Darwin" else 2**10)


# ------------------------------------------------------------------------------------------------------------
# Input batches: the four tensors (x_d, y_d, x_g, y_g) of one iteration


def synthetic_batches(args, shape, num_classes, device):
    """Random data and labels, made on the device once: every call returns the same tensors."""
    batches = (torch.randn(args.batch_size, *shape, device=device),
               torch.randint(num_classes, (args.batch_size,), device=device),
               torch.randn(args.batch_size, *shape, device=device),
               torch.randint(num_classes, (args.batch_size,), device=device))
    return lambda: batches


def write_dataset(root, options, args, count):
    """count random samples on disk, in a format train.py reads -> the dataset, as data.make_dataset
    makes it.

    PNG class folders (data.ImageFolder: train.py --data folder, or --data imagenet with --vae), or, for 4
    channels without --vae, a latent .npy as vae.py extracts it (data.LatentDataset: --data imagenet
    --data-path x.npy). Only 64 distinct PNGs are encoded; the other files are hard links to them.
    """
    rng = np.random.default_rng(args.seed)
    if options.in_channels == 3 or args.vae:
        distinct = []
        for i in range(count):
            folder = os.path.join(root, f"{i % options.num_classes:04d}")  # sorted names = label order
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{i}.png")
            if len(distinct) < 64:
                pixels = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
                distinct.append(path)
            else:
                os.link(distinct[i % 64], path)
        return data.ImageFolder(root, args.image_size)
    path = os.path.join(root, "latents.npy")
    size = args.image_size
    records = np.lib.format.open_memmap(path, mode="w+", shape=(count,), dtype=[
        ("latent", "<f2", (2, options.in_channels, size, size)), ("label", "<i8")])
    records["latent"] = rng.standard_normal((count, 2, options.in_channels, size, size), dtype=np.float32)
    records["label"] = rng.integers(0, options.num_classes, count)
    records.flush()
    return data.LatentDataset(path)


def loader_batches(root, options, args, iterations, device):
    """Batches pulled from data.Loader and, with --vae, encoded to latents, as train.py's next_batch does."""
    # Enough samples that no epoch ends within the run.
    dataset = write_dataset(root, options, args, count=(2 * iterations + 1) * args.batch_size)
    workers = data.default_workers(dataset) if args.num_workers is None else args.num_workers
    loader = data.Loader(dataset, args.batch_size, seed=args.seed, num_workers=workers, device=device)
    autoencoder = vae.load_vae(args.vae, device) if args.vae else None

    def next_batch():
        x, y = next(loader)
        return (vae.encode_latents(autoencoder, x) if autoencoder is not None else x), y

    return lambda: (*next_batch(), *next_batch())


# ------------------------------------------------------------------------------------------------------------
# Measurements


def measure_iterations(train_step, next_batches, options, device):
    """-> iteration ms (median), peak memory MiB, warm-up seconds. Runs --warmup untimed iterations (with
    --compile, the compilation happens there), then --steps timed ones."""
    def iteration():
        train_step(*next_batches())

    start = time.perf_counter()
    for _ in range(options.warmup):
        iteration()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iter_ms = median_ms(iteration, options.steps, device)
    return iter_ms, peak_memory_mb(device), warmup_s


def measure_ours(args, options, generator_kwargs, discriminator_kwargs, next_batches, step_args, device):
    """train.py's iteration: FLOPs, time, memory; and the EMA generator's sampling time.
    step_args: what train.py's loop passes train_step after the batches: (ot_scale, autocast, augment,
    guidance)."""
    autocast = step_args[1]
    nets = train.build_nets(args, generator_kwargs, discriminator_kwargs, device, distributed=False)
    # FLOPs of one iteration, on the uncompiled modules (the counter cannot see inside compiled kernels).
    plain = dataclasses.replace(nets, G_train=nets.G, G_frozen=nets.G, D_train=nets.D, D_frozen=nets.D)
    batches = next_batches()
    flops = count_flops(lambda: train.train_step(plain, args, *batches, *step_args))
    x, y = batches[2], batches[3]
    with torch.no_grad(), autocast():
        forward_flops = count_flops(lambda: nets.G(x, y, *losses.sample_times(len(x), args.nfe, device)))

    iter_ms, peak_mem_mb, warmup_s = measure_iterations(
        lambda *batches: train.train_step(nets, args, *batches, *step_args), next_batches, options, device)

    sample_nfe = 8 if args.nfe == "any" else args.nfe  # as train.py's sample grids
    noise = torch.randn_like(x)

    def sample_batch():
        with autocast():
            sample(nets.ema, noise, y, nfe=sample_nfe, pred=args.pred)

    sample_batch()
    sample_ms = median_ms(sample_batch, options.steps, device)
    return dict(iter_ms=iter_ms, flops=flops, forward_flops=forward_flops, peak_mem_mb=peak_mem_mb,
                warmup_s=warmup_s, sample_ms=sample_ms, sample_nfe=sample_nfe)


def measure_authors(args, options, generator_kwargs, discriminator_kwargs, next_batches, step_args, device):
    """The baseline's iteration: FLOPs, time and memory, measured as measure_ours does."""
    nets = authors_step.build_nets(args, generator_kwargs, discriminator_kwargs, device)
    batches = next_batches()
    flops = count_flops(lambda: authors_step.train_step(nets, args, *batches, *step_args))
    iter_ms, peak_mem_mb, _ = measure_iterations(
        lambda *batches: authors_step.train_step(nets, args, *batches, *step_args), next_batches, options,
        device)
    return dict(iter_ms=iter_ms, flops=flops, peak_mem_mb=peak_mem_mb)


def speed_fields(measured, forward_flops, batch_size, mm_tflops):
    """The report's speed fields for one kind of step, from measure_ours's or measure_authors's numbers.
    mm_tflops: the matmul peak of the run's --precision on CUDA, for mfu; None elsewhere."""
    tflops = measured["flops"] / 1e9 / (measured["iter_ms"] / 1e3) / 1e3
    fields = dict(iter_ms=measured["iter_ms"], img_per_s=batch_size / (measured["iter_ms"] / 1e3),
                  gflop_per_iter=measured["flops"] / 1e9, flop_units=measured["flops"] / forward_flops,
                  tflops=tflops, peak_mem_mb=measured["peak_mem_mb"])
    if mm_tflops is not None:
        fields["mfu"] = tflops / mm_tflops
    return fields


def run(options, args):
    """Measure train.py's iteration (and with --baseline the authors' one) -> the report, as a dict."""
    _, _, device = runtime.setup_distributed(args.device)
    train.validate(args, world_size=1)
    torch.manual_seed(args.seed)
    peaks = matmul_peaks(device)
    autocast = runtime.set_precision(args.precision, device)

    input_size = args.image_size // 8 if args.vae else args.image_size
    generator_kwargs, discriminator_kwargs = train.network_kwargs(args, options.in_channels, input_size,
                                                                  options.num_classes)
    # What train.py's loop passes train_step after the batches (lambda_ot at step 0: its value does not
    # matter here).
    step_args = (train.ot_scale_at(0, args.ot_start, args.ot_end, args.ot_decay_steps), autocast,
                 recipe.make_augment(args), recipe.make_guidance(args, device))
    measure_args = (args, options, generator_kwargs, discriminator_kwargs)
    with tempfile.TemporaryDirectory(prefix="afm-bench-") as root:
        if options.data_loader:
            runs = (2 if options.baseline else 1) * (1 + options.warmup + options.steps)
            next_batches = loader_batches(root, options, args, runs, device)
        else:
            shape = (options.in_channels, input_size, input_size)
            next_batches = synthetic_batches(args, shape, options.num_classes, device)
        ours = measure_ours(*measure_args, next_batches, step_args, device)
        authors = None
        if options.baseline:
            authors = measure_authors(*measure_args, next_batches, step_args, device)

    mm_tflops = peaks[f"mm_{args.precision}_tflops"] if device.type == "cuda" else None
    result = speed_fields(ours, ours["forward_flops"], args.batch_size, mm_tflops)
    gflops = result["tflops"] * 1e3
    result.update(gflops=gflops, **peaks, mm_fraction=gflops / peaks["mm_fp32_gflops"],
                  warmup_s=ours["warmup_s"], sample_ms=ours["sample_ms"], sample_nfe=ours["sample_nfe"])
    if authors is not None:
        theirs = speed_fields(authors, ours["forward_flops"], args.batch_size, mm_tflops)
        result.update({f"baseline_{key}": value for key, value in theirs.items()},
                      ratio=ours["iter_ms"] / authors["iter_ms"])
    result.update(model=args.model, image_size=args.image_size, in_channels=options.in_channels,
                  num_classes=options.num_classes, batch_size=args.batch_size, precision=args.precision,
                  compile=args.compile, nfe=args.nfe, repeat=args.repeat, data_loader=options.data_loader,
                  steps=options.steps, warmup=options.warmup, device=str(device), torch=torch.__version__,
                  threads=torch.get_num_threads(),
                  load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    return result


def main(argv=None):
    options, args = parse_args(argv)
    code = runtime.run(lambda: print(json.dumps(run(options, args))), False,
                       {(data.DataError, checkpoint.CheckpointError, vae.VAEError): 2})
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
