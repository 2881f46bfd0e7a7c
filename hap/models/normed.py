"""A reader's norm and its head projection in one step, for RMS norms.

Every query head and key/value group reads its own input, so a masked run norms up
to H + 2G copies of the residual per layer where the model norms one. Through the
norm module each copy costs several full-size passes forward and more backward.
For an RMS norm, ``y = gain * x / rms(x)`` with ``rms(x) = sqrt(mean(x^2) + eps)``,
the gain folds into the projection and the scale applies after it, on the
narrow head outputs:

    q = (x @ (gain * W)) / rms(x) (+ b)

and the gradient needs no pass over ``x`` beyond one multiply-add:

    dL/dx = (dq / rms) @ (gain * W)^T  -  x * sum_k(dq * (x @ (gain * W))) / (D * rms^3)

``rms_parameters`` says whether a norm module is such a norm (checked on a test
input against the module itself); anything else (LayerNorm, an identity) keeps
the module's own path.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Only float32 runs fuse. Hugging Face norms in float32 whatever the model's dtype: a float64 model keeps the
# module's path so that it matches Hugging Face bit for bit, and a reduced-precision one because the module
# casts before the gain, which the folded product would round differently.
FUSED_DTYPES = (torch.float32,)


def rms_parameters(norm: object, width: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, float] | None:
    """(gain [D], eps) when ``norm`` computes gain * x / sqrt(mean(x^2) + eps) on the last axis, else None.

    The gain is read off the module (its output on a vector of ones times sqrt(1 + eps)), which covers
    Gemma's (1 + w) as well as the plain w; the form is then checked on inputs with a non-zero mean
    (a LayerNorm, which centres, fails it)."""
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    if not isinstance(eps, (int, float)) or dtype not in FUSED_DTYPES or not callable(norm):
        return None
    eps = float(eps)
    with torch.no_grad():
        ones = torch.ones(width, device=device, dtype=dtype)
        gain = norm(ones) * (1 + eps) ** 0.5
        generator = torch.Generator().manual_seed(0)
        x = (torch.randn(4, width, generator=generator, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
        expected = gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        got = norm(x)
        try:
            same = got.shape == expected.shape and bool(torch.allclose(got, expected, rtol=1e-5, atol=1e-6))
        except (RuntimeError, NotImplementedError):  # values that cannot be read (meta or fake tensors)
            same = False
    return (gain.detach(), eps) if same else None


class _RMSNormedProjection(torch.autograd.Function):
    """x [m, B, T, D] (m = 1: one input shared by every head, m = n: one per head) -> [B, n, T, K]. Copies
    of one input as a stride-0 expansion (probed readers, ``hap.probes``) are normed and projected once;
    their gradient is still one per head."""

    @staticmethod
    def forward(ctx, x: Tensor, gain: Tensor, eps: float, weight: Tensor) -> Tensor:
        folded = weight * gain[:, None, None]  # [D, n, K]
        width = x.shape[-1]
        accumulate = torch.promote_types(x.dtype, torch.float32)
        shared = x.shape[0] == 1 or x.stride(0) == 0  # one input, or copies of it (a stride-0 expansion)
        squares = torch.linalg.vector_norm(x[:1] if shared else x, dim=-1, dtype=accumulate).square()
        scale = torch.rsqrt(squares / width + eps).to(x.dtype)  # [m, B, T], or [1, B, T] when shared
        if shared:
            projected = torch.einsum("btd,dhk->bhtk", x[0], folded)
        else:
            projected = torch.einsum("hbtd,dhk->bhtk", x, folded)
        ctx.save_for_backward(x, folded, projected, scale)
        return projected * scale.transpose(0, 1)[..., None]

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, folded, projected, scale = ctx.saved_tensors
        per_head = scale.transpose(0, 1)[..., None]  # [B, m, T, 1]
        scaled = grad * per_head
        # d scale / dx = -scale^3 x / D, times sum_k grad * projected
        through_scale = (grad * projected).sum(-1) * per_head[..., 0] ** 3 / x.shape[-1]  # [B, n, T]
        if x.shape[0] == 1:
            grad_x = torch.einsum("bhtk,dhk->btd", scaled, folded)[None]  # the heads' sum in one product
            through_scale = through_scale.sum(1, keepdim=True)
        else:
            batch, heads, length, width = scaled.shape  # one product per head, written in [n, B, T, D] order
            grad_x = torch.bmm(scaled.transpose(0, 1).reshape(heads, batch * length, width),
                               folded.permute(1, 2, 0)).view(heads, batch, length, -1)
        grad_x.addcmul_(x, through_scale.transpose(0, 1)[..., None], value=-1)
        return grad_x, None, None, None


def rms_normed_projection(x: Tensor, gain: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    """RMS-norm the reader inputs x [m, B, T, D] and project them onto the heads of ``weight`` [D, n, K]:
    [B, n, T, K], as ``einsum(norm(x), weight)`` (+ ``bias`` [n, K]) computes it. The weights take no gradient."""
    out = _RMSNormedProjection.apply(x, gain.to(x.dtype), eps, weight.detach())
    if bias is not None:
        out = out + bias[None, :, None, :]
    return out
