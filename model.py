"""The networks of Adversarial Flow Models: a plain DiT, used three ways.

AFM trains a standard, unmodified DiT (Peebles & Xie, 2023) adversarially (paper section 3.7):

    Generator      G(x_s, y [, s] [, t]) -> x_t      the transport map; image in, image out
    Discriminator  D(x_t, y [, t])       -> logit    a learned [CLS] token read out to one number
    Classifier     C(x_t, t)             -> logits   time-conditioned, for flow-based guidance (eq. 26)

All three share one backbone: patchify -> add fixed 2-D sin-cos positions -> N transformer blocks whose
LayerNorms are modulated by a conditioning vector c (adaLN-Zero) -> a read-out head. They differ only in what
goes into c and in the head. Parameter names follow the authors' code, so their released generator state dicts
load with strict=True (paper secs. 3.7-3.8; the authors' released code and weights).

Conditioning, per network:
    Generator, 1-NFE         c = emb(y)                                   (no time embedder at all)
    Generator, fixed K-step  c = emb(y) + t_embedder(1000 s)
    Generator, any-step      c = emb(y) + t_embedder(1000 s) + t_tgt_embedder(1000 t)
    Generator, repeat=R      pass r of the shared blocks uses c_r = emb(y) + t_embedder(1000 (1 - r/R))
    Discriminator            c = emb(y) [+ t_embedder(1000 t)]            (never the source time, sec. 3.4)
    Classifier               c = t_embedder(1000 t)
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------------------
# Embedders


class TimestepEmbedder(nn.Module):
    """A scalar time (already multiplied by 1000 by the caller) -> a vector of size hidden_size.

    Sinusoidal features [cos(t f_k), sin(t f_k)] with f_k = exp(-ln(10000) k / 128), k < 128, then an MLP.
    """

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):  # t: (N,) -> (N, hidden_size)
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]  # (N, 128)
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N, 256)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class index -> vector. No extra "null class" row: AFM uses classifier guidance, not CFG."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes, hidden_size)

    def forward(self, y):  # y: (N,) int -> (N, hidden_size)
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, H/p * W/p, hidden) with one strided convolution."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed(hidden_size, grid_size):
    """Fixed 2-D sin-cos position embedding, (grid_size**2, hidden_size), as in MAE and DiT.

    Half the channels encode the column, half the row; within each half, [sin, cos] at
    omega_k = 10000^(-k/(D/4)).
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)  # (D/4,)
    coords = np.arange(grid_size, dtype=np.float64)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")  # token k = (row k // g, col k % g)

    def encode(positions):  # (g*g,) -> (g*g, D/2)
        angles = positions[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols.reshape(-1)), encode(rows.reshape(-1))], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Transformer block with adaLN-Zero


def modulate(x, shift, scale):  # x: (N, T, D); shift, scale: (N, D)
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):  # (N, T, D)
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels where available
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, hidden_size, mlp_ratio):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-LN attention + MLP. The conditioning c yields shift/scale/gate for both halves (adaLN-Zero)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):  # x: (N, T, D), c: (N, D)
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Generator head: adaLN (shift, scale) then a linear map from each token to its p*p*C patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ------------------------------------------------------------------------------------------------------------
# The backbone


class DiT(nn.Module):
    """Patch embedding, positions, and the block stack. Subclasses decide the conditioning and the head."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_classes = hidden_size, num_classes
        self.grid_size = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        # Fixed, but a Parameter (requires_grad=False) so its key sits in state_dict like the authors' files.
        pos_embed = torch.tensor(sincos_pos_embed(hidden_size, self.grid_size))[None]  # (1, T, D)
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])

    def embed(self, x):  # (N, C, H, W) -> (N, T, D)
        return self.x_embedder(x) + self.pos_embed

    def initialize_weights(self):
        """DiT's initialization: xavier-uniform linears, zero biases,
        N(0, 0.02) embeddings, zero adaLN outputs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for module in self.modules():
            if isinstance(module, TimestepEmbedder):
                nn.init.normal_(module.mlp[0].weight, std=0.02)
                nn.init.normal_(module.mlp[2].weight, std=0.02)
            elif isinstance(module, LabelEmbedder):
                nn.init.normal_(module.embedding_table.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)


class Generator(DiT):
    """G: image -> image of the same shape. Conditioning by class, plus optional source / target time.

    use_t_src: multi-step models see the source time s (t_embedder).
    use_t_tgt: any-step models also see the target time t (t_tgt_embedder).
    repeat=R:  depth repetition (paper sec. 3.8): the blocks run R times, pass r marked by
               t_embedder(1000 (1 - r/R)); R = 2 and R = 4 on XL/2 are the authors' 56- and 112-layer
               1-NFE generators.
    """

    def __init__(self, use_t_src=False, use_t_tgt=False, repeat=1, **dit_kwargs):
        super().__init__(**dit_kwargs)
        assert repeat == 1 or not (use_t_src or use_t_tgt), "depth repetition is for 1-NFE generators"
        self.use_t_src, self.use_t_tgt, self.repeat = use_t_src, use_t_tgt, repeat
        if use_t_src or repeat > 1:
            self.t_embedder = TimestepEmbedder(self.hidden_size)
        if use_t_tgt:
            self.t_tgt_embedder = TimestepEmbedder(self.hidden_size)
        self.y_embedder = LabelEmbedder(self.num_classes, self.hidden_size)
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.in_channels)
        self.initialize_weights()
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):  # (N, T, p*p*C) -> (N, C, H, W)
        N, g, p, C = x.shape[0], self.grid_size, self.patch_size, self.in_channels
        x = x.reshape(N, g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(N, C, g * p, g * p)

    def forward(self, x, y, t_src=None, t_tgt=None):
        # x: (N, C, H, W) at the source time; y: (N,) labels; t_src, t_tgt: (N,) in [0, 1] -> (N, C, H, W)
        c = self.y_embedder(y)  # (N, D)
        if self.use_t_src:
            c = c + self.t_embedder(t_src * 1000)
        if self.use_t_tgt:
            c = c + self.t_tgt_embedder(t_tgt * 1000)
        h = self.embed(x)
        for r in range(self.repeat):
            c_pass = c
            if self.repeat > 1:  # mark the pass with a time-like embedding: 1, 1 - 1/R, ...
                marker = torch.full((x.shape[0],), 1000 * (1 - r / self.repeat), device=x.device)
                c_pass = c + self.t_embedder(marker)
            for block in self.blocks:
                h = block(h, c_pass)
        return self.unpatchify(self.final_layer(h, c))


class TokenReadout(DiT):
    """Shared by D and C: prepend a learned token to the patch tokens, run the blocks, read the token out."""

    def read_token(self, token, x, c):  # token: (D,), x: (N, C, H, W), c: (N, D) -> (N, D)
        h = self.embed(x)
        h = torch.cat([token.expand(h.shape[0], 1, -1).to(h.dtype), h], dim=1)  # (N, 1 + T, D)
        for block in self.blocks:
            h = block(h, c)
        return h[:, 0]


class Discriminator(TokenReadout):
    """D: image (at target time t) -> one logit per sample. Conditioned on the class, and on t when use_t."""

    def __init__(self, use_t=False, **dit_kwargs):
        super().__init__(**dit_kwargs)
        self.use_t = use_t
        self.dis_embed = nn.Parameter(torch.zeros(self.hidden_size))
        if use_t:
            self.t_embedder = TimestepEmbedder(self.hidden_size)
        self.y_embedder = LabelEmbedder(self.num_classes, self.hidden_size)
        self.final_layer = nn.Sequential(nn.LayerNorm(self.hidden_size, elementwise_affine=False, eps=1e-6),
                                         nn.Linear(self.hidden_size, 1, bias=False))
        self.initialize_weights()
        nn.init.normal_(self.dis_embed, std=0.02)

    def forward(self, x, y, t=None):  # -> (N,)
        c = self.y_embedder(y)
        if self.use_t:
            c = c + self.t_embedder(t * 1000)
        return self.final_layer(self.read_token(self.dis_embed, x, c)).squeeze(1)


class Classifier(TokenReadout):
    """C: noisy image x_t and its time t -> class logits. Trained with cross-entropy on x_t, t ~ U(0, 1)."""

    def __init__(self, **dit_kwargs):
        super().__init__(**dit_kwargs)
        self.cls_embed = nn.Parameter(torch.zeros(self.hidden_size))
        self.t_embedder = TimestepEmbedder(self.hidden_size)
        self.final_layer = nn.Sequential(nn.LayerNorm(self.hidden_size, elementwise_affine=False, eps=1e-6),
                                         nn.Linear(self.hidden_size, self.num_classes))
        self.initialize_weights()
        nn.init.normal_(self.cls_embed, std=0.02)

    def forward(self, x, t):  # -> (N, num_classes)
        c = self.t_embedder(t * 1000)
        return self.final_layer(self.read_token(self.cls_embed, x, c))


# ------------------------------------------------------------------------------------------------------------
# Sizes. Name -> DiT keyword arguments (input_size, in_channels and num_classes come from the data).

MODELS = {
    # DiT's registry: Small, Base, Large, XLarge crossed with patch 2, 4, 8.
    # Small
    **{f"S/{p}": dict(depth=12, hidden_size=384, num_heads=6, patch_size=p) for p in (2, 4, 8)},
    # Base, 130M at /2
    **{f"B/{p}": dict(depth=12, hidden_size=768, num_heads=12, patch_size=p) for p in (2, 4, 8)},
    # Large, 457M
    **{f"L/{p}": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=p) for p in (2, 4, 8)},
    # XLarge, 673M
    **{f"XL/{p}": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=p) for p in (2, 4, 8)},
    # Medium (MeanFlow's M), 306M
    "M/2": dict(depth=16, hidden_size=1024, num_heads=16, patch_size=2),
    # Tiny, 1M: laptops. /7 and /8 cut 28-px and 32-px images into 4 x 4 tokens
    **{f"T/{p}": dict(depth=4, hidden_size=128, num_heads=4, patch_size=p) for p in (2, 4, 7, 8)},
}
