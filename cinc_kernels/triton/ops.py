"""The Triton backend's ops: launchers for :mod:`.kernels`, registered as ``torch.ops.cinc_triton.*``.

The four ops have the signatures of the ``cinc`` ops (csrc/cinc_ops.cpp). They are registered with
``torch.library.custom_op`` plus the shared fake implementations, so ``torch.compile(fullgraph=True)`` traces
through them as opaque calls, like the C++ ops; their gradients are the shared formulas of
:mod:`cinc_kernels.registration`, which call these same ops.

Why not ``torch.library.triton_op`` + ``wrap_triton`` (which let Inductor see the kernels): (1) the inverse must
refuse a singular weight, a data-dependent check that cannot run while a ``triton_op`` body is traced with fake
tensors, and (2) under ``TRITON_INTERPRET=1`` torch's ``wrap_triton`` hands back the raw interpreted kernel, which
then runs on fake tensors and fails, so a ``triton_op`` could not be compiled in CI at all. Opaque ops keep one
code path that CI traces and runs.
Importing this module imports ``triton``.
"""
import contextlib
from typing import Optional

import torch
import triton

from .. import registration
from . import kernels

NAMESPACE = "cinc_triton"

# tl.dot on float32 defaults to TF32 on NVIDIA tensor cores (10-bit mantissa); the ops promise float32 accuracy,
# so float32 products are IEEE. The forward, a GEMM, follows torch's own switch for float32 GEMMs
# (torch.backends.cuda.matmul.allow_tf32, off by default); the inverse never uses TF32, whose errors it would
# amplify. Half-precision and float64 inputs ignore the setting.
_ACC_DTYPE = {torch.float64: triton.language.float64}
_TL_DTYPE = {torch.float32: triton.language.float32, torch.float64: triton.language.float64,
             torch.float16: triton.language.float16, torch.bfloat16: triton.language.bfloat16}


def _acc_dtype(dtype: torch.dtype):
    return _ACC_DTYPE.get(dtype, triton.language.float32)


def _dot_precision(dtype: torch.dtype, allow_tf32: bool = False) -> str:
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def _channel_block(C: int) -> int:
    """The tile width that holds every channel of a pixel: a power of two, ≥ 16 for ``tl.dot``."""
    return max(16, triton.next_power_of_2(C))


def _device_of(t: torch.Tensor, arg: str):
    """Triton launches on the current CUDA device: make it the tensor's (a no-op for the interpreter's CPU tensors).
    Compiled kernels cannot read CPU memory: say so, naming the argument, rather than fail inside Triton."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if not kernels.INTERPRETED:
        raise ValueError(f"{arg}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                         f"imported, to interpret them on the CPU); got a tensor on {t.device}")
    return contextlib.nullcontext()


def _wavefront_pixel_block(H: int, W: int, block_c: int) -> int:
    """Pixels solved together on one anti-diagonal: the longest diagonal (min(H, W)) in one chunk when it fits,
    since the chunks of a diagonal run one after another inside the program; ≥ 16 for ``tl.dot``; at most 64
    (32 past 64 channels, to bound the two ``pixels × channels`` accumulators in registers)."""
    return min(64 if block_c <= 64 else 32, max(16, triton.next_power_of_2(min(H, W))))


def centre_inverse(weight: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``L⁻¹`` for the masked centre tap ``L`` (``C × C``, row-major), computed in float64 and rounded once to the
    accumulation dtype (float64 for float64 weights, else float32).

    Raises ``ValueError`` when ``L`` has a zero on its diagonal (the map is singular). With ``unit_diagonal`` it
    cannot be, and the check (a device-to-host sync) is skipped.

    The kernels multiply by ``L⁻¹`` (one small GEMM per diagonal chunk) instead of substituting channel by channel
    (C dependent steps). Accuracy does not decide between them: in float32 on the CPU (C=12, 6×6, k=3),
    ``inverse(forward(x))`` erred 1.2e-7 / 2.3e+0 / 1.8e+24 with ``L⁻¹`` against 2.3e-7 / 4.1e+0 / 9.8e+23 for the C++
    substitution at cond(L) = 8 / 2.5e3 / 3.7e5: where one loses every digit, so does the other (M⁻¹ itself
    amplifies). Speed on a GPU is still unmeasured.
    """
    k = weight.shape[-1]
    C = weight.shape[0]
    L = weight[:, :, k - 1, k - 1].double().tril(-1 if unit_diagonal else 0)
    eye = torch.eye(C, dtype=torch.float64, device=weight.device)
    if unit_diagonal:
        L = L + eye
    elif bool((L.diagonal() == 0).any()):
        raise ValueError("weight: the centre tap has a zero on its diagonal, the convolution is singular")
    inv = torch.linalg.solve_triangular(L, eye, upper=False)
    return inv.to(torch.float64 if weight.dtype == torch.float64 else torch.float32).contiguous()


def launch_forward(x, weight, bias, unit_diagonal: bool, config: Optional[dict] = None) -> torch.Tensor:
    """The forward's launch. ``config`` (block sizes, and ``num_warps`` / ``num_stages``) bypasses the autotuner so
    a test can run every configuration it may pick; by default the GPU autotunes and the interpreter uses its
    fixed configuration."""
    B, C, H, W = x.shape
    k = weight.shape[-1]
    y = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    weight = weight.contiguous()
    has_bias = bias is not None

    def grid(meta):
        return (triton.cdiv(B * H * W, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_O"]))

    if config is not None:
        kernel, meta = kernels._cinc_forward_gemm_kernel, config
    else:
        kernel, meta = kernels.cinc_forward_gemm_kernel, ({} if kernels.AUTOTUNE else kernels.FORWARD_FIXED_CONFIG)
    dot_dtype = torch.float32 if (kernels.INTERPRETED and x.dtype == torch.bfloat16) else x.dtype
    precision = _dot_precision(dot_dtype, allow_tf32=x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    with _device_of(x, "x"):
        kernel[grid](
            x, weight, bias if has_bias else weight, y,
            B, C, H, W,
            *x.stride(),
            KSIZE=k, HAS_BIAS=has_bias, UNIT_DIAGONAL=unit_diagonal,
            DOT_DTYPE=_TL_DTYPE[dot_dtype], ACC_DTYPE=_acc_dtype(x.dtype), DOT_PRECISION=precision,
            **meta,
        )
    return y


@torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], unit_diagonal: bool) -> torch.Tensor:
    """``y = M x + bias``. ``x: (B, C, H, W)`` any strides, ``weight: (C, C, k, k)``, ``bias: (C,)`` or None;
    returns contiguous ``(B, C, H, W)`` of ``x``'s dtype (float32 / float64 / float16 / bfloat16)."""
    return launch_forward(x, weight, bias, unit_diagonal)


def _wavefront(src, weight, bias, unit_diagonal: bool, adjoint: bool) -> torch.Tensor:
    B, C, H, W = src.shape
    k = weight.shape[-1]
    centre_inv = centre_inverse(weight, unit_diagonal)
    out = torch.empty((B, C, H, W), dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    weight = weight.contiguous()
    has_bias = bias is not None
    block_c = _channel_block(C)
    with _device_of(src, "y" if not adjoint else "g"):
        kernels._cinc_inverse_wavefront_kernel[(B,)](
            src, weight, bias if has_bias else weight, centre_inv, out,
            C, H, W,
            *src.stride(),
            KSIZE=k, ADJOINT=adjoint, HAS_BIAS=has_bias,
            ACC_DTYPE=_acc_dtype(src.dtype), DOT_PRECISION=_dot_precision(src.dtype),
            BLOCK_P=_wavefront_pixel_block(H, W, block_c), BLOCK_C=block_c, BLOCK_K=min(block_c, 32),
            # No software pipelining: a load prefetched from the next diagonal would cross the barrier.
            num_warps=4 if block_c <= 64 else 8, num_stages=1,
        )
    return out


@torch.library.custom_op(f"{NAMESPACE}::inverse", mutates_args=())
def inverse(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], unit_diagonal: bool) -> torch.Tensor:
    """``x = M⁻¹ (y - bias)``, one launch, one program per image. ``(B, C, H, W) ->`` contiguous same, float32 /
    float64. ``ValueError`` if the centre tap is singular."""
    return _wavefront(y, weight, bias, unit_diagonal, adjoint=False)


@torch.library.custom_op(f"{NAMESPACE}::inverse_transpose", mutates_args=())
def inverse_transpose(g: torch.Tensor, weight: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``u = M⁻ᵀ g``: the wavefront from the bottom-right corner. ``(B, C, H, W) ->`` contiguous same."""
    return _wavefront(g, weight, None, unit_diagonal, adjoint=True)


@torch.library.custom_op(f"{NAMESPACE}::logdet", mutates_args=())
def logdet(weight: torch.Tensor, height: int, width: int, unit_diagonal: bool) -> torch.Tensor:
    """``H·W·Σ_c log|L[c, c]|``, a 0-dim tensor of ``weight``'s dtype (0 with ``unit_diagonal``)."""
    out = torch.zeros((), dtype=weight.dtype, device=weight.device)
    if unit_diagonal or height == 0 or width == 0:
        return out
    C, k = weight.shape[0], weight.shape[-1]
    with _device_of(weight, "weight"):
        kernels._cinc_logdet_reduce_kernel[(1,)](
            weight.contiguous(), out, C, 1,
            KSIZE=k, ACC_DTYPE=_acc_dtype(weight.dtype), BLOCK_C=min(_channel_block(C), 1024),
        )
    # Scaled by H·W as a float afterwards: the int64 product of two huge sizes would wrap (2^32 × 2^32 = 0).
    return out * (float(height) * float(width))


OPS = {
    "forward": torch.ops.cinc_triton.forward.default,
    "inverse": torch.ops.cinc_triton.inverse.default,
    "inverse_transpose": torch.ops.cinc_triton.inverse_transpose.default,
    "logdet": torch.ops.cinc_triton.logdet.default,
}

registration.register(OPS)
