"""The Triton kernels of the CInC ops (docs/spec.md §1), and the launches the launchers may choose among.
Importing this module imports ``triton`` and nothing else (no torch).

Notation: ``x``/``y`` are ``(B, C, H, W)`` with any strides (element strides are passed, so channels-last and
strided views need no copy); ``weight`` is ``(C, C, k, k)`` contiguous, read raw: every kernel applies the mask
(the centre tap ``(k-1, k-1)`` lower triangular, unit diagonal if asked) itself. Outputs are contiguous NCHW.

Supported: triton 3.6 to 3.8. Both compile every launch below for sm_80 and sm_90 ahead of time
(``make triton-aot``, :mod:`.aot`); 3.6 needs ``out_dtype`` on every float64 ``tl.dot`` (it defaults to float32).
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors with numpy (that is how CI tests them).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import triton
import triton.language as tl


# k and the two flags are run-time arguments: one compiled kernel serves every k, bias and mask (ahead of time
# too), and they are not specialised on the value 1, which triton does to integer arguments by default.
# Kernel arguments are pointers and constexprs, which Python annotations do not describe.
@triton.jit(do_not_specialize=["ksize", "has_bias", "unit_diagonal"])  # type: ignore[untyped-decorator]
def _cinc_forward_gemm_kernel(  # type: ignore[no-untyped-def]
    # pointers
    x_ptr, weight_ptr, bias_ptr, y_ptr,
    # sizes and flags
    B, C, H, W, ksize, has_bias, unit_diagonal,
    # element strides of x
    stride_xb, stride_xc, stride_xh, stride_xw,
    # meta-parameters
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``y = M x + bias`` as an implicit GEMM: rows are pixels, columns output channels, the reduction runs over
    the k·k taps and the input channels. Each program computes a ``BLOCK_P × BLOCK_O`` tile of ``y``.

    The top-left padding is a load mask (taps above or left of the image read 0) and the centre tap's mask is a
    ``tl.where`` on the weight tile, so neither a padded input nor a masked weight is ever materialised.
    ``DOT_DTYPE`` is the operands' dtype in ``tl.dot``: the input's, except bfloat16 under the interpreter, whose
    numpy matmul has no bfloat16 (it would multiply the raw bits), so there the operands are widened to float32.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1)
    HW = H * W

    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (b, i, j), int64
    pix_ok = pix < (pid_p * 0 + B) * HW  # B·H·W in int64: it may pass 2³¹ where C·H·W does not
    b = pix // HW
    i = (pix % HW) // W
    j = pix % W
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < C
    offs_c = tl.arange(0, BLOCK_C)

    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=ACC_DTYPE)
    x_pix = x_ptr + b * stride_xb + i * stride_xh + j * stride_xw
    # One flat loop over (tap, channel chunk), taps outer, with run-time shifts: the pipeliner then keeps
    # num_stages copies of one x tile and one weight tile, whatever k is. Taps unrolled at compile time inside the
    # channel loop made shared memory grow with k², past every GPU's per-block limit from k = 5 on.
    n_chunks = tl.cdiv(C, BLOCK_C)
    for step in range(0, ksize * ksize * n_chunks):
        tap = step // n_chunks
        cc = (step % n_chunks) * BLOCK_C + offs_c
        c_ok = cc < C
        di = tap // ksize - (ksize - 1)
        dj = tap % ksize - (ksize - 1)
        in_ok = (i + di >= 0) & (j + dj >= 0)
        x_tile = tl.load(x_pix[:, None] + cc[None, :] * stride_xc + (di * stride_xh + dj * stride_xw),
                         mask=(pix_ok & in_ok)[:, None] & c_ok[None, :], other=0.0)
        # w_tile[c, o] = weight[o, c, tap]: the GEMM's right operand is the tap's matrix transposed.
        w_tile = tl.load(weight_ptr + (offs_o[None, :] * C + cc[:, None]) * (ksize * ksize) + tap,
                         mask=c_ok[:, None] & o_ok[None, :], other=0.0).to(DOT_DTYPE)
        # The centre tap (the last) is masked: strictly upper entries read 0, the diagonal 1 with a unit diagonal.
        centre = tap == ksize * ksize - 1
        w_tile = tl.where(centre & (cc[:, None] > offs_o[None, :]), 0.0, w_tile)
        w_tile = tl.where(centre & (unit_diagonal != 0) & (cc[:, None] == offs_o[None, :]), 1.0, w_tile)
        acc = tl.dot(x_tile.to(DOT_DTYPE), w_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    acc += tl.load(bias_ptr + offs_o, mask=o_ok & (has_bias != 0), other=0.0).to(ACC_DTYPE)[None, :]
    y_offs = b[:, None] * C * HW + offs_o[None, :] * HW + (i * W + j)[:, None]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=pix_ok[:, None] & o_ok[None, :])


@triton.jit(do_not_specialize=["ksize", "has_bias"])  # type: ignore[untyped-decorator]
def _cinc_inverse_wavefront_kernel(  # type: ignore[no-untyped-def]
    # pointers
    src_ptr, weight_ptr, bias_ptr, centre_inv_ptr, out_ptr,
    # sizes and flags
    C, H, W, ksize, has_bias,
    # element strides of src
    stride_sb, stride_sc, stride_sh, stride_sw,
    # meta-parameters
    ADJOINT: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The wavefront solve of ``M x = y - bias`` (``ADJOINT=False``) or ``Mᵀ u = g`` (``ADJOINT=True``), one
    launch for the whole solve: program ``b`` owns image ``b`` and walks its ``H + W - 1`` anti-diagonals in order
    (from the bottom-right corner for the adjoint), with a block barrier between diagonals.

    Per pixel of a diagonal: ``r = src - bias - Σ_{taps ≠ centre} W_tap · neighbour`` (the neighbours lie on earlier
    diagonals, already solved and stored in ``out``, which doubles as the scratch image), then ``x = L⁻¹ r`` (or
    ``u = L⁻ᵀ r``) as one more small GEMM with ``centre_inv = L⁻¹`` (``C × C``, row-major, ``ACC_DTYPE``).
    ``BLOCK_C`` ≥ C holds all channels of a pixel; ``BLOCK_K`` is the reduction chunk of the tap GEMMs.
    """
    b = tl.program_id(0).to(tl.int64)
    HW = H * W
    row = b * 0 + W  # the row pitch as int64, so per-tap offsets need no int32 overflow checks
    offs_p = tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    c_ok = offs_c < C
    src_img = src_ptr + b * stride_sb
    out_img = out_ptr + b * C * HW
    bias_row = tl.load(bias_ptr + offs_c, mask=c_ok & (has_bias != 0), other=0.0).to(ACC_DTYPE)
    # x = r @ (L⁻¹)ᵀ reads L⁻¹ transposed; u = r @ L⁻¹ reads it as stored.
    if ADJOINT:
        inv_offs = offs_c[:, None] * C + offs_c[None, :]
    else:
        inv_offs = offs_c[None, :] * C + offs_c[:, None]
    inv_mask = c_ok[:, None] & c_ok[None, :]
    # Up to 64 channels L⁻¹ stays in registers for the whole solve (≤ 32 per thread at 4 warps); wider, it is
    # re-read per chunk (from L1/L2) rather than spilled.
    if BLOCK_C <= 64:
        centre_inv = tl.load(centre_inv_ptr + inv_offs, mask=inv_mask, other=0.0)

    n_diag = H + W - 1
    for step in range(n_diag):
        if ADJOINT:
            d = n_diag - 1 - step
        else:
            d = step
        i_first = tl.maximum(d - (W - 1), 0)
        n_pix = tl.minimum(d, H - 1) - i_first + 1
        for p0 in range(0, n_pix, BLOCK_P):
            p = p0 + offs_p
            p_ok = p < n_pix
            i = (i_first + p).to(tl.int64)
            j = d - i
            r = tl.load(
                src_img + offs_c[None, :] * stride_sc + (i * stride_sh + j * stride_sw)[:, None],
                mask=p_ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(ACC_DTYPE) - bias_row[None, :]
            taps = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC_DTYPE)
            pix = i * W + j
            for k0 in range(0, C, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < C
                nbr_ptrs = out_img + kk[None, :] * HW + pix[:, None]
                nbr_mask = p_ok[:, None] & k_ok[None, :]
                if ADJOINT:
                    # r[c] -= Σ_o W[o, c] u[o]: tile[o, c] = weight[o, c, tap]
                    w_ptrs = weight_ptr + (kk[:, None] * C + offs_c[None, :]) * (ksize * ksize)
                else:
                    # r[o] -= Σ_c W[o, c] x[c]: tile[c, o] = weight[o, c, tap]
                    w_ptrs = weight_ptr + (offs_c[None, :] * C + kk[:, None]) * (ksize * ksize)
                w_mask = k_ok[:, None] & c_ok[None, :]
                # Per tap only a scalar shift changes (the neighbour's offset and the tap's weight offset), which
                # keeps the loop body short; that matters most for the interpreter, which pays per operation.
                # A run-time loop, not unrolled: unrolled, the 48 taps of k = 7 took minutes to compile for sm_80.
                for tap in range(ksize * ksize - 1):  # the centre tap is the last one, k·k - 1
                    a = tap // ksize
                    bb = tap % ksize
                    if ADJOINT:
                        di = ksize - 1 - a
                        dj = ksize - 1 - bb
                        n_ok = (i + di < H) & (j + dj < W)
                    else:
                        di = a - (ksize - 1)
                        dj = bb - (ksize - 1)
                        n_ok = (i + di >= 0) & (j + dj >= 0)
                    nbr = tl.load(nbr_ptrs + (di * row + dj), mask=nbr_mask & n_ok[:, None], other=0.0)
                    w_tile = tl.load(w_ptrs + tap, mask=w_mask, other=0.0)
                    # out_dtype explicitly: triton 3.6 defaults it to float32 and rejects a float64 accumulator.
                    taps = tl.dot(nbr.to(ACC_DTYPE), w_tile.to(ACC_DTYPE), taps, input_precision=DOT_PRECISION,
                                  out_dtype=ACC_DTYPE)
            r -= taps
            if BLOCK_C > 64:
                centre_inv = tl.load(centre_inv_ptr + inv_offs, mask=inv_mask, other=0.0)
            solved = tl.dot(r, centre_inv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            tl.store(
                out_img + offs_c[None, :] * HW + (i * W + j)[:, None],
                solved.to(out_ptr.dtype.element_ty),
                mask=p_ok[:, None] & c_ok[None, :],
            )
        # The next diagonal reads what this one stored, from other threads of the program.
        tl.debug_barrier()


@triton.jit(do_not_specialize=["ksize"])  # type: ignore[untyped-decorator]
def _cinc_logdet_reduce_kernel(  # type: ignore[no-untyped-def]
    # pointers
    weight_ptr, out_ptr,
    # sizes
    C, HW, ksize,
    # meta-parameters
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out = H·W·Σ_c log|weight[c, c, k-1, k-1]|`` in one program (``-inf`` when a diagonal entry is 0)."""
    offs = tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        cc = (c0 + offs).to(tl.int64)
        ok = cc < C
        diag = tl.load(weight_ptr + ((cc * C + cc) * ksize + ksize - 1) * ksize + ksize - 1, mask=ok, other=1.0)
        total += tl.where(ok, tl.log(tl.abs(diag.to(ACC_DTYPE))), 0.0)
    tl.store(out_ptr, (tl.sum(total, axis=0) * HW).to(out_ptr.dtype.element_ty))


# By class name, so that importing this module needs nothing beyond triton (the interpreter's module imports numpy):
# the ahead-of-time check imports it in an environment that holds triton alone.
INTERPRETED = type(_cinc_forward_gemm_kernel).__name__ == "InterpretedFunction"

# What a launch is, for the launchers (which run it) and the ahead-of-time check (which compiles it for sm_80 and
# sm_90 and compares its shared memory with the model below): which kernel, its compile-time arguments, warps and
# pipeline stages. Both derive it from the functions below, so the check covers exactly what can run.
# Dtypes are named by strings ("float32", ...) to keep this module free of torch.

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_TL_DTYPE = {"float16": tl.float16, "bfloat16": tl.bfloat16, "float32": tl.float32, "float64": tl.float64}
FORWARD_DTYPES = ("float32", "float64", "float16", "bfloat16")
WAVEFRONT_DTYPES = ("float32", "float64")

# Per-block shared memory (opt-in maximum, bytes) of the compute capabilities the ahead-of-time check targets.
SHARED_LIMIT = {80: 166_912, 90: 232_448}


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: Any  # a @triton.jit function of this module
    constexprs: tuple[tuple[str, Any], ...]  # (name, value) pairs, in the kernel's argument order
    num_warps: int
    num_stages: int

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.constexprs)


def _launch(kernel: Any, constexprs: dict[str, Any], num_warps: int, num_stages: int) -> Launch:
    names = [n for n in kernel.arg_names if n in constexprs]
    return Launch(kernel, tuple((n, constexprs[n]) for n in names), num_warps, num_stages)


def _acc_dtype(dtype: str) -> Any:
    return tl.float64 if dtype == "float64" else tl.float32


def _dot_precision(dtype: str, allow_tf32: bool) -> str:
    """float32 products are IEEE unless TF32 is allowed; other dtypes ignore the setting (and float64 has no TF32)."""
    return "tf32" if dtype == "float32" and allow_tf32 else "ieee"


# Forward block sizes the GPU autotuner tries, (BLOCK_P, BLOCK_O, BLOCK_C, num_warps, num_stages); all tiles ≥ 16
# because tl.dot needs that on NVIDIA GPUs.
FORWARD_CONFIGS = (
    (64, 16, 16, 4, 3),
    (64, 32, 16, 4, 3),
    (128, 16, 16, 4, 3),
    (128, 32, 32, 4, 3),
    (64, 64, 32, 4, 3),
    (128, 64, 32, 8, 3),
    (128, 128, 32, 8, 3),
    (256, 64, 32, 8, 3),
    (64, 128, 64, 8, 2),
)
# The fixed configuration: the interpreter's (autotuning there would time numpy), or a GPU's when
# CINC_TRITON_AUTOTUNE=0 (the GPU test run, which spends its minutes on tests rather than on compiling every
# configuration for every test shape).
FORWARD_FIXED = (16, 16, 16, 4, 1) if INTERPRETED else (64, 32, 16, 4, 3)
AUTOTUNE = not INTERPRETED and os.environ.get("CINC_TRITON_AUTOTUNE", "1") != "0"


def forward_shared_bytes(block_p: int, block_o: int, block_c: int, num_stages: int, dtype: str) -> int:
    """An upper bound on the forward's shared memory: the pipeline keeps ``num_stages`` copies of one x tile
    (``BLOCK_P × BLOCK_C``) and one weight tile (``BLOCK_C × BLOCK_O``) in the dot's operand dtype, and the epilogue
    may stage the ``BLOCK_P × BLOCK_O`` accumulator; the two never live at once. Independent of k: the taps are a
    run-time loop. The ahead-of-time check asserts it is ≥ what the compiler allocates."""
    operand = DTYPE_BYTES[dtype]
    acc = 8 if dtype == "float64" else 4
    pipeline = max(num_stages, 1) * (block_p * block_c + block_c * block_o) * operand
    return max(pipeline, block_p * block_o * acc)


def forward_block_configs(C: int, dtype: str, shared_limit: Optional[int]) -> list[tuple[int, int, int, int, int]]:
    """The autotune configurations the launcher lets the autotuner try for ``C`` channels: channel tiles no wider
    than the next power of two ≥ C (wider ones only add zeros), and, given a per-block limit, only those whose
    shared memory fits. Never empty: the narrowest configuration fits every supported target."""
    widest = max(16, _next_pow2(C))
    kept = [cfg for cfg in FORWARD_CONFIGS
            if cfg[1] <= widest and cfg[2] <= widest
            and (shared_limit is None or forward_shared_bytes(cfg[0], cfg[1], cfg[2], cfg[4], dtype) <= shared_limit)]
    return kept or [FORWARD_CONFIGS[0]]


def forward_constexprs(dtype: str, allow_tf32: bool) -> dict[str, Any]:
    """The forward's compile-time arguments other than the block sizes (k, bias and mask are run-time ones).
    Under the interpreter bfloat16 operands are widened to float32: its numpy matmul has no bfloat16 (it would
    multiply the raw bits)."""
    dot_dtype = "float32" if (INTERPRETED and dtype == "bfloat16") else dtype
    return dict(DOT_DTYPE=_TL_DTYPE[dot_dtype], ACC_DTYPE=_acc_dtype(dtype),
                DOT_PRECISION=_dot_precision(dot_dtype, allow_tf32))


def forward_launches(C: int, dtype: str, allow_tf32: bool, shared_limit: Optional[int],
                     autotune: bool = AUTOTUNE) -> list[Launch]:
    """Every launch the forward may run for C channels and this dtype (any k, bias, mask): the autotuner's
    candidates, or the fixed one."""
    constexprs = forward_constexprs(dtype, allow_tf32)
    configs = forward_block_configs(C, dtype, shared_limit) if autotune else [FORWARD_FIXED]
    return [_launch(_cinc_forward_gemm_kernel, dict(constexprs, BLOCK_P=p, BLOCK_O=o, BLOCK_C=c), warps, stages)
            for p, o, c, warps, stages in configs]


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def channel_block(C: int) -> int:
    """The tile width that holds every channel of a pixel: a power of two, ≥ 16 for ``tl.dot``."""
    return max(16, _next_pow2(C))


def wavefront_pixel_block(H: int, W: int, block_c: int) -> int:
    """Pixels solved together on one anti-diagonal: the longest diagonal (min(H, W)) in one chunk when it fits,
    since the chunks of a diagonal run one after another inside the program; ≥ 16 for ``tl.dot``; at most 64
    (32 past 64 channels, to bound the two ``pixels × channels`` accumulators in registers)."""
    return min(64 if block_c <= 64 else 32, max(16, _next_pow2(min(H, W))))


def wavefront_launch(C: int, H: int, W: int, dtype: str, adjoint: bool) -> Launch:
    """The inverse's (``adjoint=False``) or the adjoint's launch, for any k and bias. No software pipelining
    (``num_stages=1``): a load prefetched from the next diagonal would cross the barrier between diagonals."""
    block_c = channel_block(C)
    return _launch(
        _cinc_inverse_wavefront_kernel,
        dict(ADJOINT=adjoint, ACC_DTYPE=_acc_dtype(dtype),
             DOT_PRECISION=_dot_precision(dtype, False), BLOCK_P=wavefront_pixel_block(H, W, block_c),
             BLOCK_C=block_c, BLOCK_K=min(block_c, 32)),
        num_warps=4 if block_c <= 64 else 8, num_stages=1)


def wavefront_shared_bytes(block_p: int, block_c: int, block_k: int, dtype: str) -> int:
    """An upper bound on the wavefront's shared memory, in the accumulation dtype: the operands of its two dots, the
    tap GEMM (``BLOCK_P × BLOCK_K`` neighbours, ``BLOCK_K × BLOCK_C`` weights) and the solve (``BLOCK_P × BLOCK_C``
    residuals, ``BLOCK_C × BLOCK_C`` for L⁻¹). Up to 64 channels L⁻¹ is loaded once before the diagonal loop and
    the compiler keeps both dots' buffers live (sum); wider, it is loaded after the tap loop and the buffers are
    shared (max): 163,840 B at 128 channels of float64, as compiled. No pipelining (``num_stages=1``).
    The ahead-of-time check asserts it is ≥ what the compiler allocates."""
    acc = 8 if dtype == "float64" else 4
    taps = block_p * block_k + block_k * block_c
    solve = block_p * block_c + block_c * block_c
    return (taps + solve if block_c <= 64 else max(taps, solve)) * acc


def wavefront_max_channels(dtype: str, shared_limit: int) -> int:
    """The most channels the inverse and its adjoint take on a GPU with this per-block limit: the widest channel
    tile whose launch (at its largest pixel block) fits. 128 on an A100 or H100/H200, float32 or float64."""
    block_c = 16
    while True:
        wider = 2 * block_c
        if wavefront_shared_bytes(wavefront_pixel_block(1 << 30, 1 << 30, wider), wider, min(wider, 32),
                                  dtype) > shared_limit:
            return block_c
        block_c = wider


def logdet_shared_bytes(block_c: int, dtype: str) -> int:
    """The reduction's scratch: at most one value per channel of the tile (in practice a few per warp)."""
    return block_c * (8 if dtype == "float64" else 4)


# The log-determinant reads C numbers once: one tile width for every C (its loop takes the rest) keeps it to one
# compiled kernel per dtype.
LOGDET_BLOCK_C = 256


def logdet_launch(C: int, dtype: str) -> Launch:
    return _launch(_cinc_logdet_reduce_kernel, dict(ACC_DTYPE=_acc_dtype(dtype), BLOCK_C=LOGDET_BLOCK_C),
                   num_warps=4, num_stages=1)


def device_shared_limit(device: Any) -> Optional[int]:
    """A CUDA device's per-block shared memory (the opt-in maximum, which triton checks a launch against); ``None``
    for the interpreter's CPU tensors, which have no such limit."""
    if device.type != "cuda":
        return None
    limit: int = triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]
    return limit


def _prune_forward_configs(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """The autotuner's candidates: exactly :func:`forward_block_configs` for this C, dtype and GPU."""
    dtype = str(named_args["x_ptr"].dtype).replace("torch.", "")
    wanted = set(forward_block_configs(int(named_args["C"]), dtype, device_shared_limit(named_args["x_ptr"].device)))
    return [c for c in configs if (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_O"], c.kwargs["BLOCK_C"], c.num_warps,
                                   c.num_stages) in wanted]


# The GPU autotunes per (C, H, W, k, bias, dtype) among forward_block_configs(C, dtype, this GPU's limit).
cinc_forward_gemm_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK_P": p, "BLOCK_O": o, "BLOCK_C": c}, num_warps=warps, num_stages=stages)
             for p, o, c, warps, stages in FORWARD_CONFIGS],
    key=["C", "H", "W", "ksize", "has_bias"],
    prune_configs_by={"early_config_prune": _prune_forward_configs},
)(_cinc_forward_gemm_kernel)
