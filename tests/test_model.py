"""model.py: compatibility with the authors' checkpoints (paper sec. 3.7), sizes, positions, init, depth
repetition."""

import math
import re

import numpy as np
import pytest
import torch

import model
pytestmark = pytest.mark.usefixtures("one_thread")

# Fixture case name -> its class and how it is called on the fixture's inputs (tests/data/README.md).
CASE_CLASS = {
    "gen_1nfe": "Generator", "gen_multi": "Generator", "gen_any": "Generator",
    "gen_deep2": "Generator", "gen_deep4": "Generator",
    "dis": "Discriminator", "dis_t": "Discriminator", "classifier": "Classifier",
}
CASE_ARGS = {
    "gen_1nfe": ("x", "y"),
    "gen_multi": ("x", "y", "t_src"),
    "gen_any": ("x", "y", "t_src", "t_tgt"),
    "gen_deep2": ("x", "y"),
    "gen_deep4": ("x", "y"),
    "dis": ("x", "y"),
    "dis_t": ("x", "y", "t_tgt"),
    "classifier": ("x", "t_src"),
}
CASES = list(CASE_ARGS)


def rel_err(out, ref):
    """max |out - ref| / max |ref|."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).abs().max() / ref.abs().max()).item()


# ------------------------------------------------------------------------------------------------------------
# The authors' outputs


@pytest.mark.parametrize("name", CASES)
def test_fixture_case_matches_reference(name, afm_ref, load_case):
    net = load_case(name)  # strict=True inside
    assert type(net).__name__ == CASE_CLASS[name]
    with torch.no_grad():
        out = net(*(afm_ref[arg] for arg in CASE_ARGS[name]))
    ref = afm_ref["cases"][name]["out"]
    assert out.shape == ref.shape
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 2e-5


def test_fixture_cases_are_all_covered(afm_ref):
    assert set(afm_ref["cases"]) == set(CASES)


def test_generator_conditioning_is_used(afm_ref, load_case):
    """Times change the output of time-conditioned generators (and do nothing to the 1-NFE one)."""
    x, y, s, t = afm_ref["x"], afm_ref["y"], afm_ref["t_src"], afm_ref["t_tgt"]
    with torch.no_grad():
        g1 = load_case("gen_1nfe")
        assert torch.equal(g1(x, y), g1(x, y, s, t))
        gm = load_case("gen_multi")
        assert (gm(x, y, s) - gm(x, y, s.flip(0))).abs().max() > 1e-3
        # the fixed-step model ignores the target time
        assert torch.equal(gm(x, y, s, t), gm(x, y, s, t.flip(0)))
        ga = load_case("gen_any")
        assert (ga(x, y, s, t) - ga(x, y, s, t.flip(0))).abs().max() > 1e-3
        dt = load_case("dis_t")
        assert (dt(x, y, t) - dt(x, y, t.flip(0))).abs().max() > 1e-4
        assert (g1(x, y) - g1(x, y.flip(0))).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------------
# Key names, shapes and parameter counts (the authors' layout)

VARIANTS = {  # fixture case name -> (class, kwargs)
    "gen_1nfe": (model.Generator, {}),
    "gen_multi": (model.Generator, dict(use_t_src=True)),
    "gen_any": (model.Generator, dict(use_t_src=True, use_t_tgt=True)),
    "gen_deep2": (model.Generator, dict(repeat=2)),
    "dis": (model.Discriminator, {}),
    "dis_t": (model.Discriminator, dict(use_t=True)),
    "classifier": (model.Classifier, {}),
}


def expected_layout(name, D, p, C, ncls, T, depth):
    """The authors' state-dict layout, written out by hand: key -> shape."""
    shapes = {"pos_embed": (1, T, D), "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,)}
    temb = lambda prefix: {f"{prefix}.mlp.0.weight": (D, 256), f"{prefix}.mlp.0.bias": (D,),  # noqa: E731
                           f"{prefix}.mlp.2.weight": (D, D), f"{prefix}.mlp.2.bias": (D,)}
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3 * D, D), f"blocks.{i}.attn.qkv.bias": (3 * D,),
            f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
            f"blocks.{i}.mlp.fc1.weight": (4 * D, D), f"blocks.{i}.mlp.fc1.bias": (4 * D,),
            f"blocks.{i}.mlp.fc2.weight": (D, 4 * D), f"blocks.{i}.mlp.fc2.bias": (D,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,),
        })
    if name.startswith("gen"):
        shapes["y_embedder.embedding_table.weight"] = (ncls, D)  # no extra CFG row
        if name in ("gen_multi", "gen_any", "gen_deep2", "gen_deep4"):
            shapes.update(temb("t_embedder"))
        if name == "gen_any":
            shapes.update(temb("t_tgt_embedder"))
        shapes.update({"final_layer.linear.weight": (p * p * C, D), "final_layer.linear.bias": (p * p * C,),
                       "final_layer.adaLN_modulation.1.weight": (2 * D, D),
                       "final_layer.adaLN_modulation.1.bias": (2 * D,)})
    elif name.startswith("dis"):
        shapes["y_embedder.embedding_table.weight"] = (ncls, D)
        if name == "dis_t":
            shapes.update(temb("t_embedder"))
        shapes.update({"dis_embed": (D,), "final_layer.1.weight": (1, D)})
    else:
        shapes.update(temb("t_embedder"))
        shapes.update({"cls_embed": (D,), "final_layer.1.weight": (ncls, D), "final_layer.1.bias": (ncls,)})
    return shapes


def key_pattern(keys):
    return {re.sub(r"^blocks\.\d+\.", "blocks.#.", k) for k in keys}


def shapes_of(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", CASES)
def test_expected_layout_agrees_with_fixture(name, afm_ref, dit_config):
    """The hand-written layout above is the authors' (checked on their small models)."""
    cfg = dit_config
    ref = {k: tuple(v.shape) for k, v in afm_ref["cases"][name]["state_dict"].items()}
    T = (cfg["input_size"] // cfg["patch_size"]) ** 2
    assert ref == expected_layout(name, cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"],
                                  cfg["num_classes"], T, cfg["depth"])


def layout_count(layout):
    return sum(math.prod(s) for s in layout.values())


@pytest.mark.parametrize("size", ["XL/2", "B/2"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_imagenet_models_have_authors_layout(name, size, afm_ref):
    cls, kwargs = VARIANTS[name]
    spec = model.MODELS[size]
    with torch.device("meta"):
        net = cls(**kwargs, input_size=32, in_channels=4, num_classes=1000, **spec)
    got = shapes_of(net)
    # Same key names as the authors' small model, modulo block indices and depth.
    assert key_pattern(got) == key_pattern(afm_ref["cases"][name]["state_dict"])
    block_ids = {int(m.group(1)) for k in got if (m := re.match(r"^blocks\.(\d+)\.", k))}
    assert block_ids == set(range(spec["depth"]))
    tokens = (32 // spec["patch_size"]) ** 2
    layout = expected_layout(name, spec["hidden_size"], spec["patch_size"], 4, 1000, tokens, spec["depth"])
    assert got == layout
    # Every parameter counts, the fixed pos_embed included; nothing lives outside parameters.
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == layout_count(layout)
    assert n_params == sum(v.numel() for v in net.state_dict().values())


@pytest.mark.parametrize("name, expected", [("gen_1nfe", 673_485_712), ("gen_multi", 675_110_032),
                                            ("dis", 670_813_056)])
def test_xl2_parameter_counts(name, expected):
    cls, kwargs = VARIANTS[name]
    with torch.device("meta"):
        net = cls(**kwargs, input_size=32, in_channels=4, num_classes=1000, **model.MODELS["XL/2"])
    assert sum(p.numel() for p in net.parameters()) == expected


def test_models_registry():
    for name in ["S/2", "B/2", "M/2", "L/2", "XL/2", "T/2"]:
        assert name in model.MODELS
    # DiT's sizes (Peebles & Xie, Table 1).
    assert model.MODELS["XL/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert model.MODELS["B/2"] == dict(depth=12, hidden_size=768, num_heads=12, patch_size=2)
    assert model.MODELS["L/2"] == dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2)
    assert model.MODELS["S/2"] == dict(depth=12, hidden_size=384, num_heads=6, patch_size=2)


@pytest.mark.parametrize("size", list(model.MODELS))
def test_every_registry_entry_builds(size):
    spec = model.MODELS[size]
    assert spec["hidden_size"] % spec["num_heads"] == 0
    assert spec["hidden_size"] % 4 == 0  # the 2-D sin-cos embedding splits channels in quarters
    D, p, depth = spec["hidden_size"], spec["patch_size"], spec["depth"]
    T = (32 // p) ** 2
    with torch.device("meta"):  # full size: structure and parameter count, no memory
        net = model.Generator(input_size=32, in_channels=4, num_classes=1000, **spec)
    assert len(net.blocks) == depth
    layout = expected_layout("gen_1nfe", D, p, 4, 1000, T, depth)
    assert sum(q.numel() for q in net.parameters()) == layout_count(layout)
    # One block at that width, through a forward pass on meta (meta forward of a full stack is slow).
    with torch.device("meta"):
        # .to("meta"): see test_device_context_places_every_tensor for where construction alone falls short.
        g = model.Generator(input_size=2 * p, in_channels=3, num_classes=10, **dict(spec, depth=1)).to("meta")
        x = torch.empty(2, 3, 2 * p, 2 * p)
        assert g(x, torch.zeros(2, dtype=torch.long)).shape == x.shape


@pytest.mark.parametrize("cls", [model.Generator, model.Discriminator, model.Classifier])
def test_device_context_places_every_tensor(cls):
    """Built under `with torch.device(...)` (meta for cheap inspection, cuda for fast init), every
    tensor of the model, the fixed pos_embed included, must live on that device, so the model runs
    there without a .to()."""
    with torch.device("meta"):
        net = cls(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=4,
                  num_classes=10)
    misplaced = sorted(k for k, v in net.state_dict().items() if v.device.type != "meta")
    assert misplaced == []


def test_laptop_model_is_small():
    with torch.device("meta"):
        g = model.Generator(input_size=32, in_channels=3, num_classes=10, **model.MODELS["T/2"])
        d = model.Discriminator(input_size=32, in_channels=3, num_classes=10, **model.MODELS["T/2"])
    assert sum(p.numel() for p in g.parameters()) < 10_000_000
    assert sum(p.numel() for p in d.parameters()) < 10_000_000


# ------------------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos positions


def reference_pos_embed(D, g):
    """MAE / DiT 2-D sin-cos, derived channel by channel: the first D/2 channels encode the column (x), the
    last D/2 the row (y); within each half, channel j < D/4 is sin(pos w_j) and channel D/4 + j is cos(pos
    w_j), with w_j = 10000^(-j / (D/4)). Token k sits at row k // g, column k % g."""
    token = np.arange(g * g)
    row, col = token // g, token % g
    out = np.zeros((g * g, D))
    q = D // 4
    for c in range(D):
        half, j = divmod(c, D // 2)
        pos = col if half == 0 else row
        fn = np.sin if j < q else np.cos
        out[:, c] = fn(pos * 10000.0 ** (-(j % q) / q))
    return out


@pytest.mark.parametrize("D, g", [(32, 4), (64, 8), (1152, 16), (256, 16)])
def test_sincos_pos_embed_matches_independent_derivation(D, g):
    got = model.sincos_pos_embed(D, g)
    assert got.shape == (g * g, D)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), reference_pos_embed(D, g), rtol=0,
                               atol=1e-6)


def test_pos_embed_matches_fixture_and_is_fixed(afm_ref, dit_config):
    D, g = dit_config["hidden_size"], dit_config["input_size"] // dit_config["patch_size"]
    ref = afm_ref["cases"]["gen_1nfe"]["state_dict"]["pos_embed"]
    assert torch.allclose(ref[0].double(), torch.from_numpy(reference_pos_embed(D, g)), atol=1e-6)
    for cls in (model.Generator, model.Discriminator, model.Classifier):
        net = cls(**dit_config)
        assert torch.allclose(net.pos_embed, ref, atol=1e-6)  # a fresh model holds the same fixed table
        assert "pos_embed" in net.state_dict()
        assert net.pos_embed.requires_grad is False
        assert "pos_embed" not in [n for n, p in net.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------------------
# DiT initialization


def test_fresh_generator_outputs_zeros(dit_config):
    torch.manual_seed(0)
    x = torch.randn(3, dit_config["in_channels"], dit_config["input_size"], dit_config["input_size"])
    y = torch.tensor([0, 4, 9])
    s, t = torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.5, 0.25, 0.0])
    for kwargs in ({}, dict(use_t_src=True), dict(use_t_src=True, use_t_tgt=True), dict(repeat=2)):
        g = model.Generator(**kwargs, **dit_config)
        with torch.no_grad():
            out = g(x, y, s, t)
        assert out.shape == x.shape
        assert torch.count_nonzero(out) == 0
        # adaLN-Zero: every block's modulation starts at zero; so does the head.
        for block in g.blocks:
            assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
            assert torch.count_nonzero(block.adaLN_modulation[-1].bias) == 0
        assert torch.count_nonzero(g.final_layer.linear.weight) == 0
        # ... while the rest is not degenerate.
        assert g.x_embedder.proj.weight.std() > 0
        assert 0.01 < g.y_embedder.embedding_table.weight.std() < 0.03  # N(0, 0.02)


def test_fresh_discriminator_and_classifier_shapes(dit_config):
    torch.manual_seed(0)
    x = torch.randn(5, dit_config["in_channels"], dit_config["input_size"], dit_config["input_size"])
    y = torch.randint(0, dit_config["num_classes"], (5,))
    t = torch.rand(5)
    with torch.no_grad():
        for d in (model.Discriminator(**dit_config), model.Discriminator(use_t=True, **dit_config)):
            out = d(x, y, t)
            assert out.shape == (5,)
            assert torch.isfinite(out).all()
            assert 0.005 < d.dis_embed.std() < 0.04  # N(0, 0.02)
        c = model.Classifier(**dit_config)
        out = c(x, t)
        assert out.shape == (5, dit_config["num_classes"])
        assert torch.isfinite(out).all()
        assert 0.005 < c.cls_embed.std() < 0.04


# ------------------------------------------------------------------------------------------------------------
# Depth repetition


# (N, T, p*p*C) -> (N, C, H, W); token k = (row k // g, col k % g), patch (p, p, C)
def unpatchify(tokens, p, C):
    N, T, _ = tokens.shape
    g = int(round(T ** 0.5))
    return tokens.reshape(N, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, g * p, g * p)


def run_by_hand(g, x, y, markers):
    c = g.y_embedder.embedding_table.weight[y]
    h = g.x_embedder.proj(x).flatten(2).transpose(1, 2) + g.pos_embed
    for m in markers:
        c_pass = c + g.t_embedder(torch.full((x.shape[0],), 1000.0 * m))
        for block in g.blocks:
            h = block(h, c_pass)
    return unpatchify(g.final_layer(h, c), g.patch_size, g.in_channels)  # the head sees the class alone


@pytest.mark.parametrize("R", [2, 4])
def test_depth_repetition_by_hand(R, afm_ref, load_case):
    g = load_case(f"gen_deep{R}")
    x, y = afm_ref["x"], afm_ref["y"]
    markers = [1 - r / R for r in range(R)]  # 1, 1 - 1/R, ...
    with torch.no_grad():
        out = g(x, y)
        by_hand = run_by_hand(g, x, y, markers)
        wrong_order = run_by_hand(g, x, y, markers[::-1])
    assert rel_err(out, by_hand) < 1e-5
    assert rel_err(by_hand, afm_ref["cases"][f"gen_deep{R}"]["out"]) < 2e-5
    assert rel_err(wrong_order, by_hand) > 1e-3  # the markers matter, so the check above means something


def test_repeat_one_runs_blocks_once(afm_ref, load_case):
    g = load_case("gen_1nfe")
    x, y = afm_ref["x"], afm_ref["y"]
    with torch.no_grad():
        h = g.x_embedder.proj(x).flatten(2).transpose(1, 2) + g.pos_embed
        c = g.y_embedder.embedding_table.weight[y]
        for block in g.blocks:
            h = block(h, c)
        by_hand = unpatchify(g.final_layer(h, c), g.patch_size, g.in_channels)
        assert rel_err(g(x, y), by_hand) < 1e-5
