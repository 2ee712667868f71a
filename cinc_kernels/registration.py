"""Where the CInC custom ops get their fake (shape-only) and autograd implementations, for every namespace.

The gradients of docs/spec.md §1 are written once here. Each formula calls other ops of the same backend (the
inverse's backward is its adjoint solve, and back), so a backend whose ops are ``torch.library`` custom ops gets
autograd and ``torch.compile`` support by handing its four ops to :func:`register`. Importing this module does so for
the C++ ops ``torch.ops.cinc.*``; the Triton backend registers ``torch.ops.cinc_triton.*`` when it is first loaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _extension
from .masks import masked_weight, weight_mask


def conv_input_grad(grad_y: torch.Tensor, weight: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``Mᵀ grad_y``: the forward's input gradient. ``(B, C, H, W) -> (B, C, H, W)``.

    The adjoint of a top-left padded correlation is a bottom-right padded correlation with the kernel flipped and
    its channel axes swapped.
    """
    k = weight.shape[-1]
    wm = masked_weight(weight, unit_diagonal)
    return F.conv2d(F.pad(grad_y, (0, k - 1, 0, k - 1)), wm.transpose(0, 1).flip(2, 3))


def conv_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``∂⟨grad_y, M x⟩/∂weight``, zero on the masked entries. ``x, grad_y: (B, C, H, W) -> (C, C, k, k)``."""
    C, k = weight.shape[0], weight.shape[-1]
    xp = F.pad(x, (k - 1, 0, k - 1, 0))
    wm = masked_weight(weight, unit_diagonal)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, xp, wm, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    )
    return grad_w * weight_mask(C, k, unit_diagonal, dtype=weight.dtype, device=weight.device)


def logdet_weight_grad(grad: torch.Tensor, weight: torch.Tensor, height: int, width: int, unit_diagonal: bool):
    """``∂(H·W·Σ log|L[c,c]|)/∂weight = H·W / L[c,c]`` on the centre tap's diagonal, zero elsewhere."""
    k = weight.shape[-1]
    if unit_diagonal:
        return torch.zeros_like(weight)
    diag = weight[:, :, k - 1, k - 1].diagonal()
    centre = torch.diag_embed(grad * (height * width) / diag)
    return F.pad(centre[:, :, None, None], (k - 1, 0, k - 1, 0))


def register_autograd_formulas(forward, inverse, inverse_transpose, logdet) -> None:
    """Attach the backward of each op; the arguments are the backend's custom ops (``torch.ops.ns.name``)."""

    def forward_setup(ctx, inputs, output):
        x, weight, bias, unit_diagonal = inputs
        ctx.save_for_backward(x, weight)
        ctx.unit_diagonal = unit_diagonal
        ctx.has_bias = bias is not None

    def forward_backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = conv_input_grad(grad_y, weight, ctx.unit_diagonal) if need_x else None
        gw = conv_weight_grad(x, grad_y, weight, ctx.unit_diagonal) if need_w else None
        gb = grad_y.sum((0, 2, 3)) if (need_b and ctx.has_bias) else None
        return gx, gw, gb, None

    def inverse_setup(ctx, inputs, output):
        _, weight, bias, unit_diagonal = inputs
        ctx.save_for_backward(output, weight)
        ctx.unit_diagonal = unit_diagonal
        ctx.has_bias = bias is not None

    def inverse_backward(ctx, grad_x):
        # x = M⁻¹(y - bias): u = M⁻ᵀ grad_x; ∂/∂y = u, ∂/∂bias = -Σu, ∂/∂weight = -(weight grad of M x against u).
        x, weight = ctx.saved_tensors
        u = inverse_transpose(grad_x.contiguous(), weight, ctx.unit_diagonal)
        need_y, need_w, need_b = ctx.needs_input_grad[:3]
        gw = -conv_weight_grad(x, u, weight, ctx.unit_diagonal) if need_w else None
        gb = -u.sum((0, 2, 3)) if (need_b and ctx.has_bias) else None
        return (u if need_y else None), gw, gb, None

    def inverse_transpose_setup(ctx, inputs, output):
        _, weight, unit_diagonal = inputs
        ctx.save_for_backward(output, weight)
        ctx.unit_diagonal = unit_diagonal

    def inverse_transpose_backward(ctx, grad_u):
        # u = M⁻ᵀ g: v = M⁻¹ grad_u; ∂/∂g = v, ∂/∂weight = -(weight grad of M v against u).
        u, weight = ctx.saved_tensors
        v = inverse(grad_u.contiguous(), weight, None, ctx.unit_diagonal)
        gw = -conv_weight_grad(v, u, weight, ctx.unit_diagonal) if ctx.needs_input_grad[1] else None
        return v, gw, None

    def logdet_setup(ctx, inputs, output):
        weight, height, width, unit_diagonal = inputs
        ctx.save_for_backward(weight)
        ctx.height, ctx.width, ctx.unit_diagonal = height, width, unit_diagonal

    def logdet_backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return logdet_weight_grad(grad, weight, ctx.height, ctx.width, ctx.unit_diagonal), None, None, None

    torch.library.register_autograd(forward, forward_backward, setup_context=forward_setup)
    torch.library.register_autograd(inverse, inverse_backward, setup_context=inverse_setup)
    torch.library.register_autograd(
        inverse_transpose, inverse_transpose_backward, setup_context=inverse_transpose_setup
    )
    torch.library.register_autograd(logdet, logdet_backward, setup_context=logdet_setup)


def register_fake_impls(forward, inverse, inverse_transpose, logdet) -> None:
    """Shapes-only implementations so ``torch.compile`` can trace the ops. Outputs are contiguous NCHW."""

    def image_like(t, *args):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    torch.library.register_fake(forward, image_like)
    torch.library.register_fake(inverse, image_like)
    torch.library.register_fake(inverse_transpose, image_like)
    torch.library.register_fake(logdet, lambda weight, height, width, unit_diagonal: weight.new_empty(()))


def register(ops) -> None:
    """Fake and autograd implementations for one backend's ops, a mapping from op name (``"forward"``, ``"inverse"``,
    ``"inverse_transpose"``, ``"logdet"``) to its ``torch.ops.<namespace>.<op>.default``."""
    ordered = [ops[name] for name in _extension.OP_NAMES]
    register_fake_impls(*ordered)
    register_autograd_formulas(*ordered)


if _extension.OPS:
    register(_extension.OPS)
