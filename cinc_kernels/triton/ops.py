"""The Triton backend's ops: launchers for :mod:`.kernels`, registered as ``torch.ops.cinc_triton.*``.

The four ops have the signatures of the ``cinc`` ops (csrc/cinc_ops.cpp). They are registered with
``torch.library.custom_op`` plus the shared fake implementations, so ``torch.compile(fullgraph=True)`` traces
through them as opaque calls, like the C++ ops; their gradients are the shared formulas of
:mod:`cinc_kernels.registration`, which call these same ops.

Why not ``torch.library.triton_op`` + ``wrap_triton`` (which let Inductor see the kernels): (1) on CPU tensors the
inverse refuses a singular weight, a data-dependent check that cannot run while a ``triton_op`` body is traced with
fake tensors, and (2) under ``TRITON_INTERPRET=1`` torch's ``wrap_triton`` hands back the raw interpreted kernel, which
then runs on fake tensors and fails, so a ``triton_op`` could not be compiled in CI at all. Opaque ops keep one
code path that CI traces and runs.
Importing this module imports ``triton``.
"""
import contextlib
from typing import Any

import torch

from .. import registration
from ..backends import get_backend
from ..contract import custom_op
from . import kernels

NAMESPACE = "cinc_triton"

# tl.dot on float32 defaults to TF32 on NVIDIA tensor cores (10-bit mantissa); the ops promise float32 accuracy,
# so float32 products are IEEE. The forward, a GEMM, follows torch's own switch for float32 GEMMs
# (torch.backends.cuda.matmul.allow_tf32, off by default); the inverse never uses TF32, whose errors it would
# amplify. Half-precision and float64 inputs ignore the setting.


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shared_limit(t: torch.Tensor) -> int | None:
    return kernels.device_shared_limit(t.device)


def _device_of(t: torch.Tensor, arg: str) -> contextlib.AbstractContextManager[Any]:
    """Triton launches on the current CUDA device: make it the tensor's (a no-op for the interpreter's CPU tensors).
    Compiled kernels cannot read CPU memory: say so, naming the argument, rather than fail inside Triton."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if not kernels.INTERPRETED:
        raise ValueError(f"{arg}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                         f"imported, to interpret them on the CPU); got a tensor on {t.device}")
    return contextlib.nullcontext()


def _check_weight_size(weight: torch.Tensor) -> None:
    """The kernels index the weight with int32 offsets (image offsets are int64): refuse a weight they cannot
    address, before anything is copied."""
    if weight.numel() >= kernels.MAX_WEIGHT_ELEMENTS:
        raise ValueError(f"weight: the Triton kernels take fewer than 2**31 weight elements; got {weight.numel()} "
                         f"(C = {weight.shape[0]}, k = {weight.shape[-1]}); backend='torch' takes any size")


def _bias_arg(bias: torch.Tensor | None, weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The bias as the kernels read it, ``C`` consecutive elements: a strided view (``b[::2]``) or an expanded one
    (``torch.tensor(.5).expand(C)``, also what ``vmap`` hands over) is copied. Without a bias the kernels still
    need a valid pointer, which they never read."""
    if bias is None:
        return weight, False
    return bias.contiguous(), True


def _singular_check_is_free(weight: torch.Tensor) -> bool:
    """Whether the launchers may look at the weight's values: on the CPU (the interpreter) that costs nothing; on a
    GPU it would stall the stream on a device-to-host copy and break CUDA-graph capture."""
    return weight.device.type == "cpu"


def centre_inverse(weight: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``L⁻¹`` for the masked centre tap ``L`` of a contiguous ``weight`` (``C × C``, row-major), computed on the
    device in one launch, in float64, and rounded once to the accumulation dtype (float64 for float64 weights, else
    float32). No device-to-host synchronisation, so an inverse can be captured in a CUDA graph.

    Raises ``ValueError`` when ``L`` has a zero on its diagonal (the map is singular) and the weight is on the CPU
    (the interpreter), where checking costs no synchronisation. On a GPU the check would stall the stream, so, as
    with the CUDA backend, a singular ``L`` gives inf/NaN in ``L⁻¹`` and in the solve. With ``unit_diagonal`` ``L``
    cannot be singular.

    The wavefront multiplies by ``L⁻¹`` (one small GEMM per diagonal chunk) instead of substituting channel by
    channel: the GEMM has no chain of C dependent steps and keeps every thread of the program busy. Accuracy does not
    decide between the two: the error of either grows with the conditioning of ``L``, and ``L`` is a diagonal block
    of ``M``, so ``‖M⁻¹‖ ≥ ‖L⁻¹‖``: an ``L`` bad enough to set them apart already costs the inverse those digits
    through ``M⁻¹`` itself (docs/conditioning.md).
    """
    C, k = weight.shape[0], weight.shape[-1]
    singular = (not unit_diagonal and _singular_check_is_free(weight)
                and bool((weight[:, :, k - 1, k - 1].diagonal() == 0).any()))
    if singular:
        raise ValueError("weight: the centre tap has a zero on its diagonal, the convolution is singular")
    out = torch.empty((C, C), dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32,
                      device=weight.device)
    if C == 0:
        return out
    launch = kernels.centre_inverse_launch(C)
    with _device_of(weight, "weight"):
        launch.kernel[(1,)](weight, out, C, k, int(unit_diagonal),
                            **launch.meta, num_warps=launch.num_warps, num_stages=launch.num_stages)
    return out


def forward_launches(x: torch.Tensor, C: int) -> list[kernels.Launch]:
    """The launches the forward may run for ``x`` (:func:`.kernels.forward_launches` for its dtype and GPU)."""
    allow_tf32 = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return kernels.forward_launches(C, _dtype_name(x.dtype), allow_tf32, _shared_limit(x))


def launch_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, unit_diagonal: bool,
                   launch: kernels.Launch | None = None) -> torch.Tensor:
    """The forward's launch. ``launch`` (one of :func:`forward_launches`) bypasses the autotuner so a test can run
    every configuration it may pick; by default the GPU autotunes and the interpreter uses its fixed
    configuration."""
    B, C, H, W = x.shape
    k = weight.shape[-1]
    _check_weight_size(weight)
    y = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    weight = weight.contiguous()
    bias_arg, has_bias = _bias_arg(bias, weight)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (-(-B * H * W // meta["BLOCK_P"]), -(-C // meta["BLOCK_O"]))

    candidates = forward_launches(x, C)
    kernel: Any
    if launch is None and kernels.AUTOTUNE:
        # The autotuner's own pruning keeps exactly the block sizes of `candidates` (kernels._prune_forward_configs).
        kernel, meta = kernels.cinc_forward_gemm_kernel, {
            n: v for n, v in candidates[0].constexprs if not n.startswith("BLOCK_")}
    else:
        launch = launch or candidates[0]
        kernel, meta = launch.kernel, dict(launch.meta, num_warps=launch.num_warps, num_stages=launch.num_stages)
    with _device_of(x, "x"):
        kernel[grid](
            x, weight, bias_arg, y,
            B, C, H, W, k, int(has_bias), int(unit_diagonal),
            *x.stride(),
            **meta,
        )
    return y


@custom_op(NAMESPACE, "forward")
def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, unit_diagonal: bool) -> torch.Tensor:
    """``y = M x + bias``. ``x: (B, C, H, W)`` any strides, ``weight: (C, C, k, k)``, ``bias: (C,)`` or None;
    returns contiguous ``(B, C, H, W)`` of ``x``'s dtype (float32 / float64 / float16 / bfloat16)."""
    return launch_forward(x, weight, bias, unit_diagonal)


def _other_backend_hint(t: torch.Tensor) -> str:
    """Names a backend that solves any C for this tensor: the portable ``torch`` one where it is registered, else
    the float64 reference."""
    try:
        name = "torch" if get_backend("torch").unavailable() is None else "reference"
    except ValueError:
        name = "reference"
    return f"backend={name!r} takes any C" + (" (in float64, slowly)" if name == "reference" else "")


def _wavefront(src: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, unit_diagonal: bool,
               adjoint: bool) -> torch.Tensor:
    """The inverse's or the adjoint's launches: ``L⁻¹`` (:func:`centre_inverse`), then the wavefront. Two launches,
    no device-to-host synchronisation."""
    B, C, H, W = src.shape
    k = weight.shape[-1]
    arg = "y" if not adjoint else "g"
    limit = _shared_limit(src)
    if limit is not None and C > kernels.wavefront_max_channels(_dtype_name(src.dtype), limit):
        raise ValueError(
            f"{arg}: the Triton {'adjoint' if adjoint else 'inverse'} keeps a C × C block in shared memory, which "
            f"holds at most {kernels.wavefront_max_channels(_dtype_name(src.dtype), limit)} channels of "
            f"{_dtype_name(src.dtype)} on this GPU; got C = {C}. {_other_backend_hint(src)}")
    # The kernel counts anti-diagonals in int32.
    if H + W > 2**31:
        raise ValueError(f"{arg}: the Triton {'adjoint' if adjoint else 'inverse'} takes images with H + W ≤ 2**31; "
                         f"got H = {H}, W = {W}")
    _check_weight_size(weight)
    weight = weight.contiguous()
    centre_inv = centre_inverse(weight, unit_diagonal)
    out = torch.empty((B, C, H, W), dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    bias_arg, has_bias = _bias_arg(bias, weight)
    launch = kernels.wavefront_launch(C, H, W, _dtype_name(src.dtype), adjoint)
    with _device_of(src, arg):
        launch.kernel[(B,)](
            src, weight, bias_arg, centre_inv, out,
            C, H, W, k, int(has_bias),
            *src.stride(),
            **launch.meta, num_warps=launch.num_warps, num_stages=launch.num_stages,
        )
    return out


@custom_op(NAMESPACE, "inverse")
def inverse(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, unit_diagonal: bool) -> torch.Tensor:
    """``x = M⁻¹ (y - bias)``: one program per image walks the anti-diagonals. ``(B, C, H, W) ->`` contiguous same,
    float32 / float64. ``ValueError`` if the centre tap is singular and the tensors are on the CPU (interpreter); on
    a GPU a singular centre tap gives inf/NaN (:func:`centre_inverse`)."""
    return _wavefront(y, weight, bias, unit_diagonal, adjoint=False)


@custom_op(NAMESPACE, "inverse_transpose")
def inverse_transpose(g: torch.Tensor, weight: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``u = M⁻ᵀ g``: the wavefront from the bottom-right corner. ``(B, C, H, W) ->`` contiguous same."""
    return _wavefront(g, weight, None, unit_diagonal, adjoint=True)


@custom_op(NAMESPACE, "logdet")
def logdet(weight: torch.Tensor, height: int, width: int, unit_diagonal: bool) -> torch.Tensor:
    """``H·W·Σ_c log|L[c, c]|``, a 0-dim tensor of ``weight``'s dtype (0 with ``unit_diagonal``)."""
    out = torch.zeros((), dtype=weight.dtype, device=weight.device)
    if unit_diagonal or height == 0 or width == 0:
        return out
    C, k = weight.shape[0], weight.shape[-1]
    launch = kernels.logdet_launch(C, _dtype_name(weight.dtype))
    with _device_of(weight, "weight"):
        launch.kernel[(1,)](weight.contiguous(), out, C, k,
                            **launch.meta, num_warps=launch.num_warps, num_stages=launch.num_stages)
    # H·W as a float, in the output's dtype: an integer product of two huge sizes would wrap (2^32 × 2^32 = 0), and a
    # float kernel argument would be float32.
    return out * (float(height) * float(width))


OPS = {
    "forward": torch.ops.cinc_triton.forward.default,
    "inverse": torch.ops.cinc_triton.inverse.default,
    "inverse_transpose": torch.ops.cinc_triton.inverse_transpose.default,
    "logdet": torch.ops.cinc_triton.logdet.default,
}

registration.register(OPS)
