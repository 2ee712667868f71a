"""Where the CInC custom ops get their fake (shape-only) and autograd implementations, for every namespace.

The gradients of docs/spec.md §1 are written once here. Each formula calls other ops of the same backend (the
inverse's backward is its adjoint solve, and back), so a backend whose ops are ``torch.library`` custom ops gets
autograd in both modes (installed as each op's ``Autograd`` dispatch kernel) and ``torch.compile`` support by
handing its four ops to :func:`register`. Importing this module does so for the C++ ops ``torch.ops.cinc.*``; the
Triton backend registers ``torch.ops.cinc_triton.*`` when it is first loaded.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch._ops import OpOverload
from torch.autograd.function import _SingleLevelFunction

from . import _extension, autocast
from ._aten import Size, anticausal_conv, causal_conv, times_pixel_count
from .contract import OP_NAMES
from .masks import free_entries, masked_weight


def conv_input_grad(grad_y: torch.Tensor, weight: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``Mᵀ grad_y``: the forward's input gradient. ``(B, C, H, W) -> (B, C, H, W)``."""
    return anticausal_conv(grad_y, masked_weight(weight, unit_diagonal))


def conv_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``∂⟨grad_y, M x⟩/∂weight``, zero on the masked entries. ``x, grad_y: (B, C, H, W) -> (C, C, k, k)``."""
    k = weight.shape[-1]
    if x.numel() == 0:
        return torch.zeros_like(weight)
    xp = F.pad(x, (k - 1, 0, k - 1, 0))
    wm = masked_weight(weight, unit_diagonal)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, xp, wm, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    )
    return free_entries(grad_w, unit_diagonal)


def logdet_weight_grad(grad: torch.Tensor, weight: torch.Tensor, height: Size, width: Size,
                       unit_diagonal: bool) -> torch.Tensor:
    """``∂(H·W·Σ log|L[c,c]|)/∂weight = H·W / L[c,c]`` on the centre tap's diagonal, zero elsewhere."""
    k = weight.shape[-1]
    if unit_diagonal:
        return torch.zeros_like(weight)
    diag = weight[:, :, k - 1, k - 1].diagonal()
    centre = torch.diag_embed(times_pixel_count(grad / diag, height, width))
    return F.pad(centre[:, :, None, None], (k - 1, 0, k - 1, 0))


def logdet_tangent(weight_tangent: torch.Tensor, weight: torch.Tensor, height: Size, width: Size,
                   unit_diagonal: bool) -> torch.Tensor:
    """``d(H·W·Σ log|L[c,c]|) = H·W·Σ dL[c,c] / L[c,c]`` (0 with ``unit_diagonal``). A 0-dim tensor."""
    k = weight.shape[-1]
    if unit_diagonal:
        return weight.new_zeros(())
    diag = weight[:, :, k - 1, k - 1].diagonal()
    d_diag = weight_tangent[:, :, k - 1, k - 1].diagonal()
    return times_pixel_count((d_diag / diag).sum(), height, width)


def _sum_tangents(*terms: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The sum of the tangent terms that are present (``None`` marks an input without a tangent)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


def _image_fold_or_loop(op: OpOverload, info: Any, in_dims: tuple[Optional[int], ...], args: tuple[Any, ...],
                        image_index: int) -> tuple[torch.Tensor, int]:
    """``vmap`` of an op: when only the image is batched, the vmapped dimension joins the image batch (one call);
    otherwise one call per vmapped slice. Returns ``(output, 0)``."""
    batched = [i for i, d in enumerate(in_dims) if d is not None]
    if image_index >= 0 and batched == [image_index]:
        t = args[image_index].movedim(in_dims[image_index], 0)
        n, b = t.shape[0], t.shape[1]
        folded = list(args)
        folded[image_index] = t.reshape(n * b, *t.shape[2:])
        out = op(*folded)
        return out.reshape(n, b, *out.shape[1:]), 0
    outs: list[torch.Tensor] = []
    for s in range(info.batch_size):
        outs.append(op(*(a.select(d, s) if d is not None else a for a, d in zip(args, in_dims))))
    return torch.stack(outs), 0


def _refuse_forward_over_forward(op: OpOverload) -> None:
    """The tangent formulas run with forward-mode AD off (as for any autograd.Function), so an enclosing
    forward-mode transform could not see through them and would get a wrong second derivative: refuse instead."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    if sum(i.key() == torch._C._functorch.TransformType.Jvp for i in stack) > 1:
        raise NotImplementedError(
            f"{op._namespace}::{op._opname}: forward-mode AD nested inside forward-mode AD (e.g. jacfwd(jacfwd(f))) "
            "is not supported; use torch.func.hessian, jacfwd(jacrev(f)) or jacrev(jacrev(f)) for second derivatives"
        )


def _differentiable_kernel(op: OpOverload, formulas: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    """The ``Autograd`` dispatch kernel of ``op``: a ``torch.autograd.Function`` carrying the reverse formula
    (``backward``) and the forward-mode formula (``jvp``), so ``backward()``, ``torch.autograd.forward_ad`` and
    ``torch.func.grad / jvp / jacfwd / jacrev / hessian`` all see the real derivative.

    ``formulas`` holds ``setup_context(ctx, inputs, output)``, ``backward(ctx, grad)`` (a gradient per op input)
    and ``jvp(ctx, *tangents)`` (a tangent per op input, ``None`` where absent). The op's own kernels run below
    the Autograd key, as ``torch.library.register_autograd`` does, so ``torch.compile`` keeps seeing one opaque op.
    """

    def forward(*args: Any) -> Any:
        *op_args, keyset = args
        # A Function's forward runs with gradients off; the levels of an enclosing torch.func transform (reached
        # by the redispatch) must still record, as in torch's own single-level functions.
        with torch.enable_grad(), _set_fwd_grad_enabled(True), torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *op_args)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        formulas["setup_context"](ctx, inputs[:-1], output)

    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return (*formulas["backward"](ctx, grad), None)

    def jvp(ctx: Any, *tangents: Any) -> Any:
        _refuse_forward_over_forward(op)
        return formulas["jvp"](ctx, *tangents[:-1])

    name = f"{op._namespace}_{op._opname}_derivatives"
    function: Any = type(name, (_SingleLevelFunction,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp),
    })

    def autograd_kernel(keyset: Any, *args: Any) -> Any:
        # The dispatcher reaches this kernel below any torch.func transform, on tensors already wrapped for the
        # current level: there the Function is applied as plain (single-level) autograd, which is what the
        # transform above records.
        with enable_single_level_autograd_function():
            return function.apply(*args, keyset)

    return autograd_kernel


# Libraries that own the registered kernels: a Library that is garbage-collected takes its kernels with it.
_LIBRARIES: list[torch.library.Library] = []


def _register_autograd_kernel(op: OpOverload, kernel: Callable[..., Any], image_index: int) -> None:
    lib = torch.library.Library(op._namespace, "IMPL")
    try:
        lib.impl(op._opname, kernel, "Autograd", with_keyset=True)
    except RuntimeError:
        # A torch.library.custom_op registers an Autograd kernel of its own (backward only), and torch releases
        # without Library.impl(allow_override=) refuse to replace a kernel registered from Python: forget it first.
        torch.library._impls.discard(f"{op._namespace}/{op._opname}/Autograd")
        lib.impl(op._opname, kernel, "Autograd", with_keyset=True)
    _LIBRARIES.append(lib)
    # A batching rule, so vmap (and jacfwd / jacrev / hessian, built on it) need not fall back to a slow loop.
    torch.library.register_vmap(
        f"{op._namespace}::{op._opname}",
        lambda info, in_dims, *args: _image_fold_or_loop(op, info, in_dims, args, image_index),
        lib=lib,
    )


def register_autograd_formulas(forward: OpOverload, inverse: OpOverload, inverse_transpose: OpOverload,
                               logdet: OpOverload) -> None:
    """Attach the reverse- and forward-mode derivatives of each op (docs/spec.md §1); the arguments are the
    backend's custom ops (``torch.ops.ns.name``). Every formula calls the same backend's ops, so higher
    derivatives (``hessian``) come from the same kernels."""

    def forward_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, bias, unit_diagonal = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.unit_diagonal = unit_diagonal
        ctx.has_bias = bias is not None

    def forward_backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = conv_input_grad(grad_y, weight, ctx.unit_diagonal) if need_x else None
        gw = conv_weight_grad(x, grad_y, weight, ctx.unit_diagonal) if need_w else None
        gb = grad_y.sum((0, 2, 3)) if (need_b and ctx.has_bias) else None
        return gx, gw, gb, None

    def forward_jvp(ctx: Any, dx: Any, dweight: Any, dbias: Any, _: Any) -> Optional[torch.Tensor]:
        # y = M(x; W) + b is linear in each of x, W, b: dy = M(dx; W) + M(x; dW) + db.
        x, weight = ctx.saved_tensors
        ud = ctx.unit_diagonal
        return _sum_tangents(
            None if dx is None else forward(dx.contiguous(), weight, None, ud),
            None if dweight is None else causal_conv(x, free_entries(dweight, ud)),
            None if dbias is None else dbias.view(1, -1, 1, 1).expand(x.shape),
        )

    def inverse_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, weight, bias, unit_diagonal = inputs
        ctx.save_for_backward(output, weight)
        ctx.save_for_forward(output, weight)
        ctx.unit_diagonal = unit_diagonal
        ctx.has_bias = bias is not None

    def inverse_backward(ctx: Any, grad_x: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        # x = M⁻¹(y - bias): u = M⁻ᵀ grad_x; ∂/∂y = u, ∂/∂bias = -Σu, ∂/∂weight = -(weight grad of M x against u).
        x, weight = ctx.saved_tensors
        u = inverse_transpose(grad_x.contiguous(), weight, ctx.unit_diagonal)
        need_y, need_w, need_b = ctx.needs_input_grad[:3]
        gw = -conv_weight_grad(x, u, weight, ctx.unit_diagonal) if need_w else None
        gb = -u.sum((0, 2, 3)) if (need_b and ctx.has_bias) else None
        return (u if need_y else None), gw, gb, None

    def inverse_jvp(ctx: Any, dy: Any, dweight: Any, dbias: Any, _: Any) -> Optional[torch.Tensor]:
        # M x = y - b, differentiated: M dx + dM x = dy - db, so dx = M⁻¹(dy - db - dM x).
        x, weight = ctx.saved_tensors
        ud = ctx.unit_diagonal
        rhs = _sum_tangents(
            dy,
            None if dbias is None else -dbias.view(1, -1, 1, 1).expand(x.shape),
            None if dweight is None else -causal_conv(x, free_entries(dweight, ud)),
        )
        if rhs is None:
            return None
        dx: torch.Tensor = inverse(rhs.contiguous(), weight, None, ud)
        return dx

    def inverse_transpose_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, weight, unit_diagonal = inputs
        ctx.save_for_backward(output, weight)
        ctx.save_for_forward(output, weight)
        ctx.unit_diagonal = unit_diagonal

    def inverse_transpose_backward(ctx: Any, grad_u: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        # u = M⁻ᵀ g: v = M⁻¹ grad_u; ∂/∂g = v, ∂/∂weight = -(weight grad of M v against u).
        u, weight = ctx.saved_tensors
        v = inverse(grad_u.contiguous(), weight, None, ctx.unit_diagonal)
        gw = -conv_weight_grad(v, u, weight, ctx.unit_diagonal) if ctx.needs_input_grad[1] else None
        return v, gw, None

    def inverse_transpose_jvp(ctx: Any, dg: Any, dweight: Any, _: Any) -> Optional[torch.Tensor]:
        # Mᵀ u = g, differentiated: Mᵀ du + dMᵀ u = dg, so du = M⁻ᵀ(dg - dMᵀ u).
        u, weight = ctx.saved_tensors
        ud = ctx.unit_diagonal
        rhs = _sum_tangents(dg, None if dweight is None else -anticausal_conv(u, free_entries(dweight, ud)))
        if rhs is None:
            return None
        du: torch.Tensor = inverse_transpose(rhs.contiguous(), weight, ud)
        return du

    def logdet_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        weight, height, width, unit_diagonal = inputs
        ctx.save_for_backward(weight)
        ctx.save_for_forward(weight)
        ctx.height, ctx.width, ctx.unit_diagonal = height, width, unit_diagonal

    def logdet_backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        (weight,) = ctx.saved_tensors
        return logdet_weight_grad(grad, weight, ctx.height, ctx.width, ctx.unit_diagonal), None, None, None

    def logdet_jvp(ctx: Any, dweight: Any, *_: Any) -> Optional[torch.Tensor]:
        (weight,) = ctx.saved_tensors
        if dweight is None:
            return None
        return logdet_tangent(dweight, weight, ctx.height, ctx.width, ctx.unit_diagonal)

    # (op, setup_context, backward, jvp, which argument is the image batch: -1 for none)
    table: list[tuple[OpOverload, Callable[..., Any], Callable[..., Any], Callable[..., Any], int]] = [
        (forward, forward_setup, forward_backward, forward_jvp, 0),
        (inverse, inverse_setup, inverse_backward, inverse_jvp, 0),
        (inverse_transpose, inverse_transpose_setup, inverse_transpose_backward, inverse_transpose_jvp, 0),
        (logdet, logdet_setup, logdet_backward, logdet_jvp, -1),
    ]
    for op, setup, backward, jvp, image_index in table:
        formulas = {"setup_context": setup, "backward": backward, "jvp": jvp}
        _register_autograd_kernel(op, _differentiable_kernel(op, formulas), image_index)


def register_fake_impls(forward: OpOverload, inverse: OpOverload, inverse_transpose: OpOverload,
                        logdet: OpOverload) -> None:
    """Shapes-only implementations so ``torch.compile`` can trace the ops. Outputs are contiguous NCHW."""

    def image_like(t: torch.Tensor, *args: Any) -> torch.Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    torch.library.register_fake(forward, image_like)
    torch.library.register_fake(inverse, image_like)
    torch.library.register_fake(inverse_transpose, image_like)
    torch.library.register_fake(logdet, lambda weight, height, width, unit_diagonal: weight.new_empty(()))


def register(ops: Mapping[str, OpOverload]) -> None:
    """Fake and autograd implementations for one backend's ops, a mapping from op name (``"forward"``, ``"inverse"``,
    ``"inverse_transpose"``, ``"logdet"``) to its ``torch.ops.<namespace>.<op>.default``."""
    ordered = [ops[name] for name in OP_NAMES]
    register_fake_impls(*ordered)
    register_autograd_formulas(*ordered)
    # Under torch.autocast every op runs in float32 (docs/spec.md §2); the rule lives in cinc_kernels/autocast.py.
    autocast.register(ops)


if _extension.OPS:
    register(_extension.OPS)
