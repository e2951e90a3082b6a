"""Gradient normalization: an identity in the forward pass that normalizes the gradient in the backward pass.

Why (paper sec. 3.4, eqs. 22-23, App. G): the adversarial gradient that reaches G's output, dL_adv/dG(z),
changes scale with D's architecture, initialization and penalty strength. Adam hides that scale from the
parameters, but in AFM it matters: it sets the balance between the adversarial term and the OT term
lambda_ot * ||G(z) - z||^2. Placing phi() between G's output and D,

    L_adv = f(D(phi(G(z))), D(x)),   phi(v) = v,   backward: g -> g / sqrt(EMA_beta(||g||^2 * numel(g))),

keeps the adversarial gradient at a fixed RMS, so one lambda_ot works for every model size. Multiplying the
squared norm by numel(g) is the paper's 1/sqrt(n) rescaling written so it does not depend on the local batch
size. The EMA decay is Adam's beta_2 = 0.9; the EMA starts at zero with no bias correction, like the authors'.

Under torch.distributed the squared norm is averaged over ranks before it enters the EMA, so every rank scales
by the same number and the buffer stays identical everywhere (every rank must run this backward each step).
The EMA is the buffer `square_avg`, so it is saved and restored with the module's state_dict.
"""

import torch
import torch.distributed as dist
import torch.nn as nn


class _NormalizeGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        m = ctx.module
        square = grad.float().square().sum() * grad.numel()  # ||g||^2 * numel(g), a scalar
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(square, op=dist.ReduceOp.AVG)
        m.square_avg.mul_(m.ema_decay).add_(square, alpha=1 - m.ema_decay)
        scale = m.target_scale / (m.square_avg.sqrt() + m.eps)
        return grad * scale.to(grad.dtype), None


class GradientNormalization(nn.Module):
    """phi in paper eq. 23. Apply it to the fake samples on their way into D, in the generator step only."""

    def __init__(self, ema_decay=0.9, eps=1e-8, target_scale=1.0):
        super().__init__()
        self.ema_decay, self.eps, self.target_scale = ema_decay, eps, target_scale
        self.register_buffer("square_avg", torch.zeros(()))

    def forward(self, x):
        return _NormalizeGradient.apply(x, self)
