"""vae.py against diffusers' AutoencoderKL (sd-vae-ft-mse layout) with seeded random weights.

tests/data/vae_reference.pt was made by running diffusers on weights drawn by the rule that
`seeded_state_dict` rebuilds: numpy RandomState(seed), walking `keys_shapes` in order, one draw per key.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import vae

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "vae_reference.pt")

# float32 through ~30 conv layers: observed max abs error ~3e-6 (encoder) and ~1.5e-5
# (decoder, outputs up to ~2.6)
ATOL, RTOL = 5e-5, 1e-5


def seeded_state_dict(keys_shapes, seed):
    """biases N(0,1)*0.05; 1-D (GroupNorm) weights U(0.8,1.2); other weights
    N(0,1)*sqrt(1/fan_in); float32."""
    rng = np.random.RandomState(seed)
    state_dict = {}
    for name, shape in keys_shapes:
        shape = tuple(shape)
        if name.endswith(".bias"):
            value = rng.randn(*shape) * 0.05
        elif len(shape) == 1:  # every 1-D weight of this VAE belongs to a GroupNorm
            value = rng.uniform(0.8, 1.2, shape)
        else:
            value = rng.randn(*shape) * np.sqrt(1.0 / np.prod(shape[1:]))
        state_dict[name] = torch.from_numpy(value.astype(np.float32))
    return state_dict


def to_legacy(state_dict, conv_kernels=False):
    """The old diffusers spelling query/key/value/proj_attn, optionally as (C, C, 1, 1) conv kernels."""
    legacy = {}
    for name, tensor in state_dict.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{old}.")
                if conv_kernels and tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]
        legacy[name] = tensor
    return legacy


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture(scope="module")
def state_dict(reference):
    return seeded_state_dict(reference["keys_shapes"], reference["seed"])


def build(state_dict):
    """An AutoencoderKL holding `state_dict` (built on the meta device: skips the default init, for speed)."""
    with torch.device("meta"):
        m = vae.AutoencoderKL()
    m.load_state_dict(state_dict, assign=True)
    return m.eval()


def run(m, reference):
    with torch.no_grad():
        mean, logvar = m.encode(reference["image"])
        decoded = m.decode(reference["latent"])
    return mean, logvar, decoded


@pytest.fixture(scope="module")
def model(state_dict):
    return build(state_dict)


@pytest.fixture(scope="module")
def outputs(model, reference):
    return run(model, reference)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, state_dict):
    """The seeded weights as a legacy-spelling diffusers .bin file (written once: it is 335 MB)."""
    path = str(tmp_path_factory.mktemp("weights") / "diffusion_pytorch_model.bin")
    torch.save(to_legacy(state_dict), path)
    return path


def test_parameter_names_and_shapes_are_diffusers(reference):
    with torch.device("meta"):
        ours = [(name, list(t.shape)) for name, t in vae.AutoencoderKL().state_dict().items()]
    assert ours == [(name, list(shape)) for name, shape in reference["keys_shapes"]]


def test_matches_diffusers(outputs, reference):
    mean, logvar, decoded = outputs
    assert mean.shape == logvar.shape == (2, 4, 4, 4) and decoded.shape == (2, 3, 32, 32)
    torch.testing.assert_close(mean, reference["enc_mean"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logvar, reference["enc_logvar"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(decoded, reference["decoded"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("conv_kernels", [False, True])
def test_legacy_attention_keys_give_identical_outputs(outputs, state_dict, reference, conv_kernels):
    legacy = to_legacy(state_dict, conv_kernels)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert not any(".to_q." in k for k in legacy)
    for ours, expected in zip(run(build(legacy), reference), outputs):
        assert torch.equal(ours, expected)


def test_logvar_is_clamped(state_dict):
    # a quant_conv bias of -100 on the logvar channels pushes logvar far below the clamp
    m = build(dict(state_dict, **{"quant_conv.bias": torch.tensor([0.0] * 4 + [-100.0] * 4)}))
    with torch.no_grad():
        _, logvar = m.encode(torch.zeros(1, 3, 16, 16))
    assert torch.all(logvar == -30.0)


def test_load_vae_reads_bin_file(weights_file, reference, outputs):
    loaded = vae.load_vae(weights_file)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for ours, expected in zip(run(loaded, reference), outputs):
        assert torch.equal(ours, expected)


def test_wrong_keys_and_shapes_name_the_key(tmp_path, state_dict):
    path = str(tmp_path / "wrong.pth")
    torch.save({"encoder.conv_inn.weight": torch.zeros(128, 3, 3, 3)}, path)
    with pytest.raises(vae.VAEError, match=r"wrong\.pth: missing key 'encoder\.conv_in\.weight'"):
        vae.load_vae(path)

    renamed = dict(state_dict)
    renamed["decoder.conv_inn.weight"] = renamed.pop("decoder.conv_in.weight")
    with torch.device("meta"):
        m = vae.AutoencoderKL()
    with pytest.raises(vae.VAEError, match=r"missing key 'decoder\.conv_in\.weight'"):
        m.load_state_dict(renamed)

    reshaped = dict(state_dict, **{"quant_conv.weight": torch.zeros(8, 4, 1, 1)})
    with pytest.raises(vae.VAEError,
                       match=r"'quant_conv\.weight' has shape \(8, 4, 1, 1\), expected \(8, 8, 1, 1\)"):
        m.load_state_dict(reshaped)

    extra = dict(state_dict, **{"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(vae.VAEError, match=r"unexpected key 'encoder\.extra\.weight'"):
        m.load_state_dict(extra)

    with pytest.raises(vae.VAEError, match="not found"):
        vae.load_vae(str(tmp_path / "absent.bin"))


@pytest.mark.parametrize("problem", ["missing weights", "missing output directory", "image size"])
def test_cli_errors_are_one_line(tmp_path, weights_file, capsys, problem):
    out = tmp_path / "latents.npy"
    args = {"--weights": weights_file, "--data-path": str(tmp_path), "--out": str(out), "--image-size": "20"}
    expected = "multiple of 8"
    if problem == "missing weights":
        args.update({"--weights": str(tmp_path / "absent.bin"), "--image-size": "16"})
        expected = "absent.bin"
    elif problem == "missing output directory":
        args.update({"--out": str(tmp_path / "no_such_dir" / "latents.npy"), "--image-size": "16"})
        expected = "no_such_dir"
    assert vae.main([word for item in args.items() for word in item]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []  # nothing written


def test_cli_extracts_both_flips(tmp_path, weights_file, model):
    data = pytest.importorskip("data")
    rng = np.random.RandomState(1)
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "images" / cls)
        for i in range(2):
            pixels = rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / cls / f"{i}.png")
    out = tmp_path / "latents.npy"
    argv = ["--weights", weights_file, "--data-path", str(tmp_path / "images"), "--out", str(out)]
    flags = ["--image-size", "16", "--batch-size", "3", "--workers", "0", "--device", "cpu"]
    assert vae.main(argv + flags) == 0

    records = np.load(out, mmap_mode="r")
    assert records.dtype == np.dtype([("latent", "<f2", (2, 4, 2, 2)), ("label", "<i8")])
    assert records.shape == (4,) and not os.path.exists(str(out) + ".tmp")
    assert sorted(records["label"].tolist()) == [0, 0, 1, 1]

    # record i = data.ImageFolder's image i: its latent, then the latent of its mirror image
    folder = data.ImageFolder(str(tmp_path / "images"), 16)
    images, labels = zip(*(folder[(i, False)] for i in range(len(folder))))
    assert records["label"].tolist() == list(labels)
    x = torch.stack(images).float() / 127.5 - 1.0  # (4, 3, 16, 16)
    with torch.no_grad():
        mean, _ = model.encode(torch.cat([x, x.flip(-1)]))  # (8, 4, 2, 2)
    expected = vae.SCALING_FACTOR * torch.stack([mean[:4], mean[4:]], dim=1)  # (4, 2, 4, 2, 2)
    latents = torch.from_numpy(records["latent"].astype(np.float32))
    torch.testing.assert_close(latents, expected, atol=2e-3, rtol=2e-3)  # fp16 storage
    assert (latents[:, 0] - latents[:, 1]).abs().amax() > 1e-2  # the flip really changes the latents
