"""The CUDA path: what `torchrun train.py --model XL/2` runs on a GPU, checked against the CPU
path and the fixtures.

Skipped as a whole without CUDA; part of the normal suite where CUDA is there. tools/gpu_check.sh
runs it first.

    parity      the authors' reference outputs (tests/data/afm_reference.pt, loaded by conftest's load_case as
                tests/test_model.py and tests/test_sample.py do) on CUDA, in fp32, TF32 and bf16 autocast; the
                VAE against diffusers' outputs (tests/data/vae_reference.pt), in fp32 and
                train.py's bf16 encode
    train_step  1-NFE, 2-NFE and any-step, in fp32, TF32 and bf16: finite losses, and the same parameters
                move, the gradnorm buffer fills and the EMA follows G as in the same step on the CPU
    --compile   compiled steps equal eager steps within tolerance; no graph breaks, a bounded number of
                compiled frames, no recompilation after warm-up (the requires_grad toggling of D included)
    DDP         world size 1 over NCCL through train.setup_distributed / train.build_nets, eager and compiled:
                the NCCL all-reduce in the gradnorm backward and DDP's gradient hooks; steps equal plain steps
    loader      data.Loader's pinned, non-blocking copies deliver the bytes the CPU loader delivers
    end to end  train.py (--compile, bf16, a VAE encoding on the fly) for a few steps, --resume,
                sample.py --npz

Tolerances are on rel_err = max |out - ref| / max |ref| (tests/test_model.py), each justified
where it is defined.
"""

import json
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch._dynamo
from PIL import Image
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel as DDP

import bench
import checkpoint
import data
import sample as sample_mod
import train
import vae
from test_model import CASE_ARGS, rel_err
from test_vae import REFERENCE as VAE_REFERENCE, build as build_vae, seeded_state_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")
CPU = torch.device("cpu")

# Reference parity tolerances (rel_err). The CPU tests hold fp32 to 2e-5.
# fp32: 1e-4. With TF32 off (train.set_precision("fp32") turns off cuBLAS' and cuDNN's), CUDA differs from
#   the CPU only in summation order (cuBLAS tiling, the memory-efficient attention kernel's online
#   softmax): a few fp32 roundings, ~1e-6 here; 5x the CPU bound leaves room for split-K reductions without
#   hiding a wrong kernel.
# tf32: 2e-2. TF32 rounds matmul inputs to 10 mantissa bits (bf16 has 7), outputs stay fp32. bf16 autocast on
#   the CPU measured at most 3.6e-2 on these cases (the discriminator, 7e-3 elsewhere); TF32's unit roundoff
#   is 8x smaller, so ~5e-3 is expected: 2e-2 keeps a 4x margin, and a wrong result is O(1).
# bf16: 1e-1, ~3x the 3.6e-2 measured with bf16 autocast on the CPU (CUDA's flash kernels round
# the same inputs).
PARITY_TOL = {"fp32": 1e-4, "tf32": 2e-2, "bf16": 1e-1}
# The VAE (~30 convolutions): fp32 on the CPU is 4e-6 from diffusers; 1e-4 allows cuDNN's algorithms 25x that.
# bf16 autocast on the CPU measured 1.7e-2 on the mean and logvar: 5e-2 is 3x that.
VAE_TOL = {"fp32": 1e-4, "bf16": 5e-2}
# The authors' sampler cases of tests/test_sample.py: (reference name, fixture case, nfe, pred).
SAMPLE_CASES = [("multi_v_nfe4", "gen_multi", 4, "v"), ("multi_v_nfe2", "gen_multi", 2, "v"),
                ("any_v_nfe3", "gen_any", 3, "v"), ("multi_x_nfe2", "gen_multi", 2, "x")]

# Training-step tests: T/2 on 4 x 16 x 16 latents (64 tokens), batch 8, 10 classes.
MODEL, CHANNELS, SIZE, BATCH, CLASSES = "T/2", 4, 16, 8, 10
# Compiled or DDP steps vs eager steps, same weights and same random stream (the noise is drawn outside the
# compiled modules). fp32 kernels that fuse and reorder reductions differ by ~1e-6 relative per op; AdamW's
# first steps (beta1 = 0) move each weight by ~lr * sign(grad), so a weight whose gradient is within rounding
# of 0 may step the other way. Losses: rel 1e-3 over 4 steps. Weights: how far the two runs end apart, over
# how far they moved, below 0.05 (a wrong gradient or a missed update gives O(1)).
STEP_LOSS_RTOL, UPDATE_RATIO = 1e-3, 0.05
# One step calls 5 distinct (module, grad mode, D frozen, batch size) signatures: G under no_grad (D update),
# G with grad (G update), D trainable on 2B + 2k samples, D frozen under no_grad and D frozen with grad on B.
# Measured with the aot_eager backend on the CPU: 5 frames, 0 graph breaks, none after the first step.
MAX_FRAMES = 5


@pytest.fixture
def precision():
    """precision name -> the autocast context train.py would use on CUDA; the TF32 switches restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def set_precision(name):
        autocast = train.set_precision(name, CUDA)
        assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == (name != "fp32")
        return autocast

    yield set_precision
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------------------------
# Parity with the references


@pytest.mark.parametrize("name", list(CASE_ARGS))
@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16"])
def test_networks_match_reference(name, mode, afm_ref, load_case, precision):
    autocast = precision(mode)
    net = load_case(name).to(CUDA)
    with torch.no_grad(), autocast():
        out = net(*(afm_ref[arg].to(CUDA) for arg in CASE_ARGS[name]))
    assert out.device.type == "cuda"
    assert rel_err(out.float().cpu(), afm_ref["cases"][name]["out"]) < PARITY_TOL[mode]


@pytest.mark.parametrize("name, case, nfe, pred", SAMPLE_CASES)
@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16"])
def test_sampler_matches_reference(name, case, nfe, pred, mode, afm_ref, load_case, precision):
    autocast = precision(mode)
    ref = afm_ref["sample"]
    with autocast():
        out = sample_mod.sample(load_case(case).to(CUDA), ref["noise"].to(CUDA), ref["labels"].to(CUDA),
                                nfe=nfe, pred=pred)
    assert out.device.type == "cuda" and not out.requires_grad
    assert rel_err(out.float().cpu(), ref[name]) < PARITY_TOL[mode]


@pytest.fixture(scope="module")
def vae_reference():
    """diffusers' outputs and an AutoencoderKL holding the same seeded weights, on CUDA."""
    reference = torch.load(VAE_REFERENCE, weights_only=True)
    return reference, build_vae(seeded_state_dict(reference["keys_shapes"], reference["seed"])).to(CUDA)


def test_vae_fp32_matches_diffusers(vae_reference, precision):
    reference, autoencoder = vae_reference
    precision("fp32")
    with torch.no_grad():
        mean, logvar = autoencoder.encode(reference["image"].to(CUDA))
        decoded = autoencoder.decode(reference["latent"].to(CUDA))
    assert rel_err(mean.cpu(), reference["enc_mean"]) < VAE_TOL["fp32"]
    assert rel_err(logvar.cpu(), reference["enc_logvar"]) < VAE_TOL["fp32"]
    assert rel_err(decoded.cpu(), reference["decoded"]) < VAE_TOL["fp32"]


def test_bf16_encode_matches_diffusers(vae_reference, precision):
    """vae.encode_latents, the on-the-fly encoding of train.py: bf16 autocast on CUDA, fp32 latents out. The
    posterior noise is drawn again from the same seed to build the expected sample from diffusers'
    mean/logvar."""
    reference, autoencoder = vae_reference
    precision("tf32")
    torch.manual_seed(3)
    latents = vae.encode_latents(autoencoder, reference["image"].to(CUDA))
    torch.manual_seed(3)
    noise = torch.randn(reference["enc_mean"].shape, device=CUDA).cpu()
    expected = vae.SCALING_FACTOR * (reference["enc_mean"] + torch.exp(0.5 * reference["enc_logvar"]) * noise)
    assert latents.dtype == torch.float32 and latents.device.type == "cuda"
    assert rel_err(latents.cpu(), expected) < VAE_TOL["bf16"]


# ------------------------------------------------------------------------------------------------------------
# Training steps


def make_nets(device, nfe="1", mode="fp32", compile=False, distributed=False):
    """train.py's args and networks for the test model; the same initial weights on every device (built on the
    CPU from seed 0 inside build_nets, then moved)."""
    argv = ["--model", MODEL, "--batch-size", str(BATCH), "--nfe", nfe, "--precision", mode]
    args = train.parse_args(argv + (["--compile"] if compile else []))
    generator_kwargs, discriminator_kwargs = train.network_kwargs(args, CHANNELS, SIZE, CLASSES)
    torch.manual_seed(0)
    return args, train.build_nets(args, generator_kwargs, discriminator_kwargs, device,
                                  distributed=distributed)


def batches(step, device):
    """The four tensors of one train_step, the same on every device: (B, 4, 16, 16) data and (B,)
    labels, twice."""
    gen = torch.Generator().manual_seed(1000 + step)
    x_d, x_g = (torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen) for _ in range(2))
    y_d, y_g = (torch.randint(CLASSES, (BATCH,), generator=gen) for _ in range(2))
    return [t.to(device) for t in (x_d, y_d, x_g, y_g)]


def snapshot(module):
    return {name: p.detach().float().cpu().clone() for name, p in module.named_parameters()}


def moved(before, module, lr):
    """Parameters that took an optimizer step: AdamW's first step moves a weight with a non-zero gradient
    by about lr (beta1 = 0: lr * g / |g|); weight decay alone moves it by lr * 0.01 * |w|.
    Zero-initialised gates (adaLN-Zero) leave whole tensors without gradient in the first step, which is
    what makes this set informative."""
    after = snapshot(module)
    return {name for name in before if (after[name] - before[name]).abs().max() > lr / 2}


def one_step(device, nfe, mode):
    """One train_step from the shared initial weights -> (metrics, ok, G moved, D moved, gradnorm buffer,
    nets, G before, EMA before, args)."""
    args, nets = make_nets(device, nfe, mode)
    autocast = train.set_precision(mode, device)
    g_before, d_before, ema_before = snapshot(nets.G), snapshot(nets.D), snapshot(nets.ema)
    torch.manual_seed(7)
    metrics, ok = train.train_step(nets, args, *batches(0, device), 0.2, autocast)
    return dict(metrics=metrics, ok=ok, g_moved=moved(g_before, nets.G, args.g_lr),
                d_moved=moved(d_before, nets.D, args.lr), square_avg=nets.gradnorm.square_avg.item(),
                nets=nets, g_before=g_before, ema_before=ema_before, args=args)


@pytest.fixture(scope="module")
def cpu_steps():
    """nfe -> the same step on the CPU in fp32: what the CUDA steps are compared with."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(8, previous))
    steps = {nfe: one_step(CPU, nfe, "fp32") for nfe in ("1", "2", "any")}
    torch.set_num_threads(previous)
    return steps


@pytest.mark.parametrize("nfe", ["1", "2", "any"])
@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16"])
def test_train_step_on_cuda_moves_what_the_cpu_moves(nfe, mode, cpu_steps, precision):
    precision(mode)  # restores the switches afterwards; one_step sets them as train.py does
    cpu, gpu = cpu_steps[nfe], one_step(CUDA, nfe, mode)
    assert gpu["ok"]
    for name, value in gpu["metrics"].items():
        assert value.device.type == "cuda" and torch.isfinite(value).all(), name
    assert set(gpu["metrics"]) == set(cpu["metrics"])
    # The same tensors receive gradient steps as on the CPU: both updates ran, D frozen in the G
    # update did not leak, and the set is not trivial (the adaLN-Zero gates keep most block weights
    # still in the first step).
    assert gpu["g_moved"] == cpu["g_moved"] and gpu["d_moved"] == cpu["d_moved"]
    assert gpu["g_moved"] and gpu["d_moved"]
    assert "pos_embed" not in gpu["d_moved"]  # fixed positions
    nets = gpu["nets"]
    assert all(p.requires_grad for p in nets.d_params)  # D trainable again after the G update
    # The gradient normalizer's EMA starts at 0: one G backward fills it, on both devices.
    assert gpu["square_avg"] > 0 and np.isfinite(gpu["square_avg"]) and cpu["square_avg"] > 0
    # The EMA took its step toward G: ema = before + (1 - decay) (G - before), as the fused lerp computes it.
    decay = gpu["args"].ema_decay
    for name, p in nets.ema.named_parameters():
        trained = dict(nets.G.named_parameters())[name].detach().cpu()
        expected = gpu["ema_before"][name].lerp(trained, 1 - decay)
        torch.testing.assert_close(p.detach().cpu(), expected, rtol=1e-6, atol=1e-7)  # fp32 rounding only


def run_steps(nets, args, count, autocast, first=0):
    """count train_steps, the random stream reseeded before each so that two runs draw the same noise -> the
    losses (d_loss, g_loss) of each step, as floats."""
    losses = []
    for step in range(first, first + count):
        torch.manual_seed(100 + step)
        metrics, ok = train.train_step(nets, args, *batches(step, CUDA), 0.2, autocast)
        assert ok
        losses.append((metrics["d_loss"].item(), metrics["g_loss"].item()))
    return losses


def assert_same_training(eager, other, eager_losses, other_losses, initial):
    np.testing.assert_allclose(other_losses, eager_losses, rtol=STEP_LOSS_RTOL)
    for net in ("G", "D", "ema"):
        start = initial[net]
        a, b = snapshot(getattr(eager, net)), snapshot(getattr(other, net))
        travelled = torch.cat([(a[k] - start[k]).flatten() for k in a]).norm()
        apart = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
        assert travelled > 0 and apart / travelled < UPDATE_RATIO, (net, apart.item(), travelled.item())
    assert other.gradnorm.square_avg.item() == pytest.approx(eager.gradnorm.square_avg.item(),
                                                             rel=STEP_LOSS_RTOL)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def frames():
    return counters["frames"]["total"]


def test_compiled_steps_match_eager_without_recompiling(precision, fresh_dynamo):
    autocast = precision("fp32")
    args, eager = make_nets(CUDA)
    _, compiled = make_nets(CUDA, compile=True)
    assert isinstance(compiled.G_train, torch._dynamo.eval_frame.OptimizedModule)
    initial = {net: snapshot(getattr(eager, net)) for net in ("G", "D", "ema")}
    eager_losses = run_steps(eager, args, 4, autocast)

    compiled_losses = run_steps(compiled, args, 2, autocast)  # warm-up: every variant compiles in step 0
    warm_frames = frames()
    assert 0 < warm_frames <= MAX_FRAMES, dict(counters["frames"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile now raises
        compiled_losses += run_steps(compiled, args, 2, autocast, first=2)
    assert frames() == warm_frames
    assert_same_training(eager, compiled, eager_losses, compiled_losses, initial)
    # What a checkpoint saves (the objective's state_dict) comes from the plain modules: no torch.compile prefix.
    for module in (compiled.G, compiled.D, compiled.ema, compiled.gradnorm):
        assert not any(key.startswith("_orig_mod.") for key in module.state_dict())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank(monkeypatch):
    """torchrun's environment for one process; train.setup_distributed starts NCCL. Torn down afterwards."""
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    rank, world_size, device = train.setup_distributed(None)
    assert (rank, world_size, device.type) == (0, 1, "cuda") and dist.get_backend() == "nccl"
    yield device
    dist.destroy_process_group()


@pytest.mark.parametrize("compile", [False, True])
def test_ddp_one_gpu_matches_plain_steps(compile, one_rank, precision, fresh_dynamo):
    """Under torchrun with one GPU: DDP(G) and DDP(D) from train.build_nets, averaged gradients (a no-op for
    one rank, so the steps equal plain steps), and gradnorm's all-reduce in the backward, over NCCL."""
    autocast = precision("fp32")
    args, plain = make_nets(CUDA)
    _, wrapped = make_nets(one_rank, compile=compile, distributed=True)
    for train_wrapper in (wrapped.G_train, wrapped.D_train):
        inner = getattr(train_wrapper, "_orig_mod", train_wrapper)
        assert isinstance(inner, DDP)
    # no sync when frozen
    assert not isinstance(getattr(wrapped.D_frozen, "_orig_mod", wrapped.D_frozen), DDP)
    initial = {net: snapshot(getattr(plain, net)) for net in ("G", "D", "ema")}
    plain_losses = run_steps(plain, args, 4, autocast)
    wrapped_losses = run_steps(wrapped, args, 2, autocast)
    warm_frames = frames()
    with torch._dynamo.config.patch(error_on_recompile=True):
        wrapped_losses += run_steps(wrapped, args, 2, autocast, first=2)
    assert frames() == warm_frames and (warm_frames > 0) == compile
    assert_same_training(plain, wrapped, plain_losses, wrapped_losses, initial)


# ------------------------------------------------------------------------------------------------------------
# Data loading and the command lines


def test_loader_pinned_copies_deliver_the_cpu_batches(tmp_path):
    """data.Loader on CUDA (pinned memory, non_blocking copies, a worker process) against the CPU loader."""
    options = types.SimpleNamespace(in_channels=CHANNELS, num_classes=CLASSES)
    args = types.SimpleNamespace(seed=0, image_size=SIZE, vae=None)
    dataset = bench.write_dataset(str(tmp_path), options, args, count=64)  # SD-VAE latents in a .npy
    on_cuda = data.Loader(dataset, 16, seed=5, num_workers=1, device=CUDA)
    on_cpu = data.Loader(dataset, 16, seed=5, num_workers=0, device=CPU)
    for _ in range(6):  # across an epoch boundary (4 batches per epoch)
        (x_cuda, y_cuda), (x_cpu, y_cpu) = next(on_cuda), next(on_cpu)
        assert x_cuda.device.type == y_cuda.device.type == "cuda"
        assert torch.equal(x_cuda.cpu(), x_cpu) and torch.equal(y_cuda.cpu(), y_cpu)


def write_images(root, count=16, classes=2, size=256):
    """An image folder at ImageNet's size, for `--data imagenet` with an on-the-fly VAE."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def run_cli(*argv, cwd):
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_compiled_bf16_resume_then_sample_npz(tmp_path):
    """train.py as a user runs it on a GPU: compiled G and D in bf16, 256 px images encoded by a VAE in bf16
    on the fly (seeded random weights: the pipeline, not the pictures), 3 steps, --resume to 5, then sample.py
    --npz on CUDA decoding with the same VAE."""
    images = write_images(tmp_path / "images")
    reference = torch.load(VAE_REFERENCE, weights_only=True)
    vae_path = tmp_path / "vae.bin"
    torch.save(seeded_state_dict(reference["keys_shapes"], reference["seed"]), vae_path)
    out = tmp_path / "out"
    common = ["--data", "imagenet", "--data-path", images, "--vae", vae_path, "--model", MODEL,
              "--batch-size", "4", "--num-workers", "1", "--compile", "--precision", "bf16",
              "--log-every", "1", "--ckpt-every", "3", "--sample-every", "1000", "--out-dir", out,
              "--device", "cuda"]
    run_cli(ROOT / "train.py", *common, "--max-steps", "3", cwd=tmp_path)
    assert checkpoint.load(str(out / "ckpt.pt"))["step"] == 3
    run_cli(ROOT / "train.py", *common, "--max-steps", "5", "--resume", cwd=tmp_path)

    state = checkpoint.load(str(out / "ckpt.pt"))
    assert state["step"] == 5 and state["config"]["compile"] and state["config"]["precision"] == "bf16"
    assert state["generator_kwargs"]["in_channels"] == 4 and state["generator_kwargs"]["input_size"] == 32
    for name in ("G", "ema", "D", "gradnorm"):
        assert not any(key.startswith("_orig_mod.") for key in state[name]), name
        assert all(torch.isfinite(value).all() for value in state[name].values()), name
    assert state["gradnorm"]["square_avg"] > 0
    records = [json.loads(line) for line in open(out / "log.jsonl") if "d_loss" in line]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # the resumed run continued at step 4
    assert all(np.isfinite(r[key]) for r in records
               for key in ("d_loss", "g_loss", "g_grad_norm", "d_grad_norm"))
    assert (out / "samples_00000005.png").exists()  # the final grid, decoded by the VAE

    run_cli(ROOT / "sample.py", "--ckpt", out / "ckpt.pt", "--vae", vae_path, "--npz", tmp_path / "s.npz",
            "--num-samples", "6", "--batch-size", "4", "--device", "cuda", cwd=tmp_path)
    with np.load(tmp_path / "s.npz") as samples:
        assert samples["arr_0"].shape == (6, 256, 256, 3) and samples["arr_0"].dtype == np.uint8
        assert sorted(samples["labels"].tolist()) == list(range(6))  # class-balanced over 1000 classes
