"""The Triton kernels of the CInC ops (shared/SPEC.md §1). Importing this module imports ``triton``.

Notation: ``x``/``y`` are ``(B, C, H, W)`` with any strides (element strides are passed, so channels-last and
strided views need no copy); ``weight`` is ``(C, C, k, k)`` contiguous, read raw: every kernel applies the mask
(the centre tap ``(k-1, k-1)`` lower triangular, unit diagonal if asked) itself. Outputs are contiguous NCHW.

Written against the Triton 3.6 language (the GPU machine) and run on 3.8; nothing newer than 3.6 is used.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors with numpy (that is how CI tests them).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _cinc_forward_gemm_kernel(
    # pointers
    x_ptr, weight_ptr, bias_ptr, y_ptr,
    # sizes
    B, C, H, W,
    # element strides of x
    stride_xb, stride_xc, stride_xh, stride_xw,
    # meta-parameters
    KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, UNIT_DIAGONAL: tl.constexpr,
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
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < C
        x_ptrs = x_pix[:, None] + cc[None, :] * stride_xc
        x_mask = pix_ok[:, None] & c_ok[None, :]
        # w_tile[c, o] = weight[o, c, tap]: the GEMM's right operand is the tap's matrix transposed.
        w_ptrs = weight_ptr + (offs_o[None, :] * C + cc[:, None]) * (KSIZE * KSIZE)
        w_mask = c_ok[:, None] & o_ok[None, :]
        # Unrolled: each tap's shift is a compile-time constant and only the centre tap carries the mask.
        for tap in tl.static_range(KSIZE * KSIZE):
            di = tap // KSIZE - (KSIZE - 1)
            dj = tap % KSIZE - (KSIZE - 1)
            in_ok = (i + di >= 0) & (j + dj >= 0)
            x_tile = tl.load(x_ptrs + (di * stride_xh + dj * stride_xw), mask=x_mask & in_ok[:, None], other=0.0)
            w_tile = tl.load(w_ptrs + tap, mask=w_mask, other=0.0).to(DOT_DTYPE)
            if tap == KSIZE * KSIZE - 1:
                w_tile = tl.where(cc[:, None] > offs_o[None, :], 0.0, w_tile)
                if UNIT_DIAGONAL:
                    w_tile = tl.where(cc[:, None] == offs_o[None, :], 1.0, w_tile)
            acc = tl.dot(x_tile.to(DOT_DTYPE), w_tile, acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(ACC_DTYPE)[None, :]
    y_offs = b[:, None] * C * HW + offs_o[None, :] * HW + (i * W + j)[:, None]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=pix_ok[:, None] & o_ok[None, :])


@triton.jit
def _cinc_inverse_wavefront_kernel(
    # pointers
    src_ptr, weight_ptr, bias_ptr, centre_inv_ptr, out_ptr,
    # sizes
    C, H, W,
    # element strides of src
    stride_sb, stride_sc, stride_sh, stride_sw,
    # meta-parameters
    KSIZE: tl.constexpr, ADJOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    if HAS_BIAS:
        bias_row = tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(ACC_DTYPE)
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
            ).to(ACC_DTYPE)
            if HAS_BIAS:
                r -= bias_row[None, :]
            taps = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC_DTYPE)
            pix = i * W + j
            for k0 in range(0, C, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < C
                nbr_ptrs = out_img + kk[None, :] * HW + pix[:, None]
                nbr_mask = p_ok[:, None] & k_ok[None, :]
                if ADJOINT:
                    # r[c] -= Σ_o W[o, c] u[o]: tile[o, c] = weight[o, c, tap]
                    w_ptrs = weight_ptr + (kk[:, None] * C + offs_c[None, :]) * (KSIZE * KSIZE)
                else:
                    # r[o] -= Σ_c W[o, c] x[c]: tile[c, o] = weight[o, c, tap]
                    w_ptrs = weight_ptr + (offs_c[None, :] * C + kk[:, None]) * (KSIZE * KSIZE)
                w_mask = k_ok[:, None] & c_ok[None, :]
                # Per tap only a scalar shift changes (the neighbour's offset and the tap's weight offset), which
                # keeps the loop body short; that matters most for the interpreter, which pays per operation.
                # Unrolled: the tap's shifts are compile-time constants (and plain ints for the interpreter).
                for tap in tl.static_range(KSIZE * KSIZE - 1):  # the centre tap is the last one, k·k - 1
                    a = tap // KSIZE
                    bb = tap % KSIZE
                    if ADJOINT:
                        di = KSIZE - 1 - a
                        dj = KSIZE - 1 - bb
                        n_ok = (i + di < H) & (j + dj < W)
                    else:
                        di = a - (KSIZE - 1)
                        dj = bb - (KSIZE - 1)
                        n_ok = (i + di >= 0) & (j + dj >= 0)
                    nbr = tl.load(nbr_ptrs + (di * row + dj), mask=nbr_mask & n_ok[:, None], other=0.0)
                    w_tile = tl.load(w_ptrs + tap, mask=w_mask, other=0.0)
                    taps = tl.dot(nbr.to(ACC_DTYPE), w_tile.to(ACC_DTYPE), taps, input_precision=DOT_PRECISION)
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


@triton.jit
def _cinc_logdet_reduce_kernel(
    # pointers
    weight_ptr, out_ptr,
    # sizes
    C, HW,
    # meta-parameters
    KSIZE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out = H·W·Σ_c log|weight[c, c, k-1, k-1]|`` in one program (``-inf`` when a diagonal entry is 0)."""
    offs = tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        cc = (c0 + offs).to(tl.int64)
        ok = cc < C
        diag = tl.load(weight_ptr + ((cc * C + cc) * KSIZE + KSIZE - 1) * KSIZE + KSIZE - 1, mask=ok, other=1.0)
        total += tl.where(ok, tl.log(tl.abs(diag.to(ACC_DTYPE))), 0.0)
    tl.store(out_ptr, (tl.sum(total, axis=0) * HW).to(out_ptr.dtype.element_ty))


INTERPRETED = isinstance(_cinc_forward_gemm_kernel, InterpretedFunction)


def forward_configs():
    """Block sizes the GPU autotuner tries; all ≥ 16 because ``tl.dot`` needs that on NVIDIA GPUs."""
    configs = []
    for block_p, block_o, block_c, warps, stages in [
        (64, 16, 16, 4, 3),
        (64, 32, 16, 4, 3),
        (128, 16, 16, 4, 3),
        (128, 32, 32, 4, 3),
        (64, 64, 32, 4, 3),
        (128, 64, 32, 8, 3),
        (128, 128, 32, 8, 3),
        (256, 64, 32, 8, 3),
        (64, 128, 64, 8, 2),
    ]:
        configs.append(
            triton.Config({"BLOCK_P": block_p, "BLOCK_O": block_o, "BLOCK_C": block_c},
                          num_warps=warps, num_stages=stages)
        )
    return configs


def _prune_forward_configs(configs, named_args, **kwargs):
    """Channel tiles much wider than C only add zeros: keep the tiles up to the next power of two ≥ C."""
    widest = max(16, triton.next_power_of_2(int(named_args["C"])))
    kept = [c for c in configs if c.kwargs["BLOCK_O"] <= widest and c.kwargs["BLOCK_C"] <= widest]
    return kept or configs[:1]


# The interpreter runs one fixed, small configuration (autotuning there would time numpy); a GPU autotunes per
# (C, H, W, k, bias, dtype), unless CINC_TRITON_AUTOTUNE=0 asks for one fixed configuration (the GPU test run does,
# to spend its minutes on tests rather than on compiling every configuration for every test shape).
AUTOTUNE = not INTERPRETED and os.environ.get("CINC_TRITON_AUTOTUNE", "1") != "0"
FORWARD_FIXED_CONFIG = (
    {"BLOCK_P": 16, "BLOCK_O": 16, "BLOCK_C": 16}
    if INTERPRETED
    else {"BLOCK_P": 64, "BLOCK_O": 32, "BLOCK_C": 16, "num_warps": 4, "num_stages": 3}
)
if not AUTOTUNE:
    cinc_forward_gemm_kernel = _cinc_forward_gemm_kernel
else:
    cinc_forward_gemm_kernel = triton.autotune(
        configs=forward_configs(),
        key=["C", "H", "W", "KSIZE", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_forward_configs},
    )(_cinc_forward_gemm_kernel)
