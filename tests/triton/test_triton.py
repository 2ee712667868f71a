"""The Triton backend against the float64 reference: values, layouts, dtypes, gradients, registration, compile.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched on before ``triton``
is first imported: ``make test-triton`` sets TRITON_INTERPRET=1 for its own pytest process, and the guard below
does the same for a by-hand ``pytest tests/triton``. The interpreter pays per Triton operation, so the shapes here
are small (B ≤ 3, C ≤ 12, H, W ≤ 9, and a few wider ones for the chunk loops). On a GPU, run
``python -m pytest tests/triton`` without TRITON_INTERPRET: the kernels are compiled and full-size cases are added.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One fixed forward configuration instead of autotuning each test shape (minutes of compiling);
    # test_every_forward_config_matches_reference covers every configuration the autotuner may pick.
    os.environ.setdefault("CINC_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402

import cinc_kernels as ck  # noqa: E402
from cinc_kernels import reference  # noqa: E402
from cinc_kernels.backends import get_backend  # noqa: E402
from tests.cases import RTOL, make_image, make_weight, rel_error, with_layout  # noqa: E402

_WHY_NOT = get_backend("triton").unavailable()
if _WHY_NOT is None and not torch.cuda.is_available() and not ck.triton.INTERPRETED:
    _WHY_NOT = "triton was imported before TRITON_INTERPRET=1 was set; run `make test-triton`"
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"Triton backend unavailable: {_WHY_NOT}")

# Compiled kernels run on the GPU at full sizes too; the interpreter (CI, or `make test-triton` on any machine) runs
# the small shapes on CPU tensors.
ON_GPU = torch.cuda.is_available() and not ck.triton.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"

# (B, C, H, W, k, bias, unit_diagonal): odd and prime sizes, H ≠ W, 1×1 images, C = 1, k ∈ {1, 2, 3, 5}.
CASES = [
    (2, 3, 5, 7, 3, True, False),
    (1, 12, 9, 9, 3, True, True),
    (3, 1, 1, 1, 2, False, False),
    (2, 4, 5, 4, 5, False, True),
    (1, 5, 7, 3, 1, True, False),
    (3, 7, 2, 9, 2, False, False),
    (1, 2, 9, 1, 5, True, False),
    # Past the small shapes, for the kernels' chunk loops: two reduction chunks of 32 channels; a channel tile of
    # 128 (L⁻¹ re-read per chunk, not kept in registers).
    (1, 40, 3, 4, 2, True, False),
    (1, 70, 2, 3, 3, False, True),
]
# Full-size cases, compiled kernels only.
GPU_CASES = [pytest.param(case, marks=pytest.mark.gpu_smoke) for case in
             [(4, 48, 32, 32, 3, True, False), (2, 12, 31, 17, 5, False, True), (3, 96, 16, 16, 3, True, False),
              (2, 128, 9, 40, 7, True, False)]] if ON_GPU else []


def _ids(case):
    B, C, H, W, k, bias, unit = case
    return f"B{B}C{C}_{H}x{W}_k{k}{'_bias' if bias else ''}{'_unit' if unit else ''}"


def _inputs(case, dtype, seed):
    B, C, H, W, k, bias, unit = case
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, dtype, DEVICE, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE) if bias else None
    x = make_image(B, C, H, W, dtype, DEVICE, generator=g)
    return w, b, x


def _adjoint_apply(u, w, unit):
    """``Mᵀ u`` in float64: the vector-Jacobian product of the reference forward."""
    zeros = torch.zeros(u.shape, dtype=torch.float64, device=u.device, requires_grad=True)
    (mt_u,) = torch.autograd.grad(reference.forward(zeros, w.double(), None, unit), zeros, u.double())
    return mt_u


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES + GPU_CASES, ids=_ids)
def test_ops_match_reference(case, dtype):
    """Forward against the reference; the inverse solves the reference's output (x is then known exactly); the
    adjoint's result, multiplied by Mᵀ, gives back its input; the log-determinant against the reference."""
    B, C, H, W, k, bias, unit = case
    w, b, x = _inputs(case, dtype, seed=hash(_ids(case)) % 2**31)
    tol = RTOL[dtype]
    b64 = None if b is None else b.double()

    y = ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend="triton")
    y_ref = reference.forward(x.double(), w.double(), b64, unit)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert rel_error(y, y_ref) <= tol

    # The inverse amplifies rounding by up to the conditioning of M (modest for these weights).
    x_hat = ck.cinc_conv2d_inverse(y_ref.to(dtype), w, b, unit_diagonal=unit, backend="triton")
    assert x_hat.dtype == dtype and x_hat.shape == x.shape
    assert rel_error(x_hat, x) <= 20 * tol

    u = ck.cinc_conv2d_inverse_transpose(x, w, unit_diagonal=unit, backend="triton")
    assert u.dtype == dtype and u.shape == x.shape
    assert rel_error(_adjoint_apply(u, w, unit), x) <= 20 * tol

    ld = ck.cinc_logdet(w, H, W, unit_diagonal=unit, backend="triton")
    assert ld.dtype == dtype and ld.dim() == 0
    torch.testing.assert_close(ld.double().cpu(), reference.logdet(w.double(), H, W, unit).cpu(),
                               rtol=tol, atol=tol * H * W)


@pytest.mark.gpu_smoke
def test_diagonals_longer_than_one_pixel_block():
    """min(H, W) = 65 > 64 pixels per block: each diagonal is solved in two chunks, one after the other."""
    w, b, x = _inputs((1, 1, 66, 65, 2, True, False), torch.float32, seed=5)
    y_ref = reference.forward(x.double(), w.double(), b.double())
    assert rel_error(ck.cinc_conv2d(x, w, b, backend="triton"), y_ref) <= RTOL[torch.float32]
    x_hat = ck.cinc_conv2d_inverse(y_ref.float(), w, b, backend="triton")
    assert rel_error(x_hat, x) <= 20 * RTOL[torch.float32]
    u = ck.cinc_conv2d_inverse_transpose(x, w, backend="triton")
    assert rel_error(_adjoint_apply(u, w, False), x) <= 20 * RTOL[torch.float32]


@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=_ids)
def test_strided_inputs(case, layout):
    """The kernels read through the input's strides: a strided view and channels-last give the same values."""
    B, C, H, W, k, bias, unit = case
    dtype = torch.float32
    w, b, x = _inputs(case, dtype, seed=7)
    tol = RTOL[dtype]
    y = ck.cinc_conv2d(with_layout(x, layout), w, b, unit_diagonal=unit, backend="triton")
    y_ref = reference.forward(x.double(), w.double(), None if b is None else b.double(), unit)
    assert rel_error(y, y_ref) <= tol
    x_hat = ck.cinc_conv2d_inverse(with_layout(y_ref.to(dtype), layout), w, b, unit_diagonal=unit, backend="triton")
    assert rel_error(x_hat, x) <= 20 * tol
    u = ck.cinc_conv2d_inverse_transpose(with_layout(x, layout), w, unit_diagonal=unit, backend="triton")
    assert rel_error(_adjoint_apply(u, w, unit), x) <= 20 * tol


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]], ids=_ids)
def test_forward_half_precision(case, dtype):
    """float16 / bfloat16 in and out, float32 accumulation: compared with the reference on the same rounded inputs."""
    w, b, x = _inputs(case, dtype, seed=3)
    unit = case[-1]
    y = ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend="triton")
    assert y.dtype == dtype
    y_ref = reference.forward(x.double(), w.double(), None if b is None else b.double(), unit)
    assert rel_error(y, y_ref) <= RTOL[dtype]


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_forward_config_matches_reference(dtype):
    """Each launch the forward may pick for this C and dtype on an A100 or H100/H200 (the autotuner's candidates
    after pruning, and the fixed one), forced in turn: C = 20 is no multiple of any channel tile, so the channel and
    pixel masks of every tiling are exercised, and k = 3 runs the tap loop past the centre tap."""
    from cinc_kernels.triton import kernels, ops

    w, b, x = _inputs((2, 20, 5, 7, 3, True, False), dtype, seed=12)
    y_ref = reference.forward(x.double(), w.double(), b.double())
    name = str(dtype).replace("torch.", "")
    launches = {launch for limit in kernels.SHARED_LIMIT.values() for autotune in (True, False)
                for launch in kernels.forward_launches(20, name, False, limit, autotune)}
    assert len(launches) >= 4
    for launch in launches:
        y = ops.launch_forward(x, w, b, False, launch=launch)
        assert rel_error(y, y_ref) <= RTOL[dtype], f"launch {launch}"


# Per-block shared memory of the GPUs the launchers must fit: the targets of the ahead-of-time check (A100, H100/H200)
# and two smaller ones (consumer Ampere/Ada; the 48 KiB every GPU grants without opting in).
LIMITS = (49_152, 101_376, 166_912, 232_448)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_forward_keeps_only_configs_that_fit(dtype):
    """For every C and GPU the autotuner gets at least one configuration, and only ones the shared-memory model fits
    (the ahead-of-time check proves the model an upper bound of what the compiler allocates)."""
    from cinc_kernels.triton import kernels

    for limit in LIMITS:
        for C in list(range(1, 70)) + [127, 128, 129, 255, 256, 257, 1000, 4097]:
            launches = kernels.forward_launches(C, dtype, False, limit, autotune=True)
            assert launches
            for launch in launches:
                m = launch.meta
                shared = kernels.forward_shared_bytes(m["BLOCK_P"], m["BLOCK_O"], m["BLOCK_C"], launch.num_stages,
                                                      dtype)
                assert shared <= limit, (C, launch)
                assert m["BLOCK_O"] <= max(16, 2 * C) and m["BLOCK_C"] <= max(16, 2 * C)
    fixed = kernels.forward_launches(20, dtype, False, None, autotune=False)
    assert len(fixed) == 1
    m = fixed[0].meta
    assert all(kernels.forward_shared_bytes(m["BLOCK_P"], m["BLOCK_O"], m["BLOCK_C"], fixed[0].num_stages, dtype)
               <= limit for limit in LIMITS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autotuner_prunes_to_the_launchers_configs(dtype, monkeypatch):
    """The GPU autotuner's pruning hook keeps exactly the configurations forward_launches lists (which the
    ahead-of-time check compiles), here for an A100's limit, where float64 loses the widest ones."""
    import triton
    from cinc_kernels.triton import kernels

    monkeypatch.setattr(kernels, "device_shared_limit", lambda device: kernels.SHARED_LIMIT[80])
    configs = [triton.Config({"BLOCK_P": p, "BLOCK_O": o, "BLOCK_C": c}, num_warps=nw, num_stages=ns)
               for p, o, c, nw, ns in kernels.FORWARD_CONFIGS]
    for C in (1, 20, 48, 300):
        kept = kernels._prune_forward_configs(configs, {"x_ptr": torch.empty(0, dtype=dtype), "C": C})
        name = str(dtype).replace("torch.", "")
        want = kernels.forward_launches(C, name, False, kernels.SHARED_LIMIT[80], autotune=True)
        assert [(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_O"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages)
                for c in kept] == [(m.meta["BLOCK_P"], m.meta["BLOCK_O"], m.meta["BLOCK_C"], m.num_warps,
                                    m.num_stages) for m in want]
    assert len(kept) < len(configs) if dtype == torch.float64 else len(kept) == len(configs)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_wavefront_launches_fit_up_to_the_channel_limit(dtype):
    from cinc_kernels.triton import kernels

    assert kernels.wavefront_max_channels(dtype, kernels.SHARED_LIMIT[80]) == 128
    for limit in LIMITS:
        largest = kernels.wavefront_max_channels(dtype, limit)
        for C in range(1, largest + 1):
            for H, W in [(1, 1), (5, 200), (64, 64), (300, 301)]:
                launch = kernels.wavefront_launch(C, H, W, dtype, adjoint=False)
                m = launch.meta
                assert m["BLOCK_C"] >= C
                assert kernels.wavefront_shared_bytes(m["BLOCK_P"], m["BLOCK_C"], m["BLOCK_K"], dtype) <= limit


@pytest.mark.parametrize("op", ["inverse", "inverse_transpose"])
def test_channels_past_the_gpu_limit_are_refused_naming_a_backend_that_works(op, monkeypatch):
    """On a GPU whose shared memory cannot hold the channel tile the op refuses before launching, naming the
    argument and a backend that takes any C; that backend then solves it."""
    from cinc_kernels.triton import kernels, ops

    monkeypatch.setattr(ops, "_shared_limit", lambda t: kernels.SHARED_LIMIT[80])
    C = kernels.wavefront_max_channels("float32", kernels.SHARED_LIMIT[80]) + 1
    w = make_weight(C, 1, torch.float32, DEVICE)
    y = torch.randn(1, C, 1, 2, device=DEVICE)
    fn = ck.cinc_conv2d_inverse if op == "inverse" else ck.cinc_conv2d_inverse_transpose
    with pytest.raises(ValueError, match=r"^(y|g): .*C = 129.*backend='(torch|reference)' takes any C") as info:
        fn(y, w, backend="triton")
    other = info.value.args[0].split("backend='")[1].split("'")[0]
    assert fn(y, w, backend=other).shape == y.shape


@pytest.mark.parametrize("C,k", [(1, 3), (5, 2), (12, 3), (4, 5)])
def test_inverse_of_forward_is_identity(C, k):
    g = torch.Generator().manual_seed(C * 10 + k)
    w = make_weight(C, k, torch.float32, DEVICE, generator=g)
    b = torch.randn(C, generator=g).to(DEVICE)
    x = make_image(2, C, 7, 9, torch.float32, DEVICE, generator=g)
    for unit in (False, True):
        y = ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend="triton")
        x_hat = ck.cinc_conv2d_inverse(y, w, b, unit_diagonal=unit, backend="triton")
        assert rel_error(x_hat, x) <= 20 * RTOL[torch.float32]


@pytest.mark.gpu_smoke
def test_float64_accumulation():
    """``accumulate=torch.float64`` runs the float64 kernels on float32 tensors and returns float32."""
    w, b, x = _inputs(CASES[0], torch.float32, seed=9)
    y = reference.forward(x.double(), w.double(), b.double())
    x_hat = ck.cinc_conv2d_inverse(y.float(), w, b, backend="triton", accumulate=torch.float64)
    assert x_hat.dtype == torch.float32
    assert rel_error(x_hat, x) <= 2 * RTOL[torch.float32]
    u = ck.cinc_conv2d_inverse_transpose(x, w, backend="triton", accumulate=torch.float64)
    assert u.dtype == torch.float32
    assert rel_error(_adjoint_apply(u, w, False), x) <= 2 * RTOL[torch.float32]


@pytest.mark.parametrize("op", ["forward", "inverse", "inverse_transpose"])
def test_empty_batch_and_images(op):
    w = make_weight(5, 3, torch.float32, DEVICE)
    fn = {"forward": ck.cinc_conv2d, "inverse": ck.cinc_conv2d_inverse,
          "inverse_transpose": ck.cinc_conv2d_inverse_transpose}[op]
    for shape in [(0, 5, 4, 3), (2, 5, 0, 3), (2, 5, 3, 0)]:
        out = fn(torch.randn(shape, device=DEVICE), w, backend="triton")
        assert out.shape == shape and out.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's numpy log(0)
def test_singular_centre_tap():
    """A zero on L's diagonal: the inverse and its adjoint refuse, the log-determinant is -inf; with a unit diagonal
    the same raw weight is fine."""
    w = make_weight(4, 3, torch.float32, DEVICE)
    w[2, 2, 2, 2] = 0
    y = torch.randn(1, 4, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        ck.cinc_conv2d_inverse(y, w, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        ck.cinc_conv2d_inverse_transpose(y, w, backend="triton")
    assert ck.cinc_logdet(w, 3, 5, backend="triton").item() == float("-inf")
    x = ck.cinc_conv2d_inverse(y, w, unit_diagonal=True, backend="triton")
    assert rel_error(ck.cinc_conv2d(x, w, unit_diagonal=True, backend="triton"), y) <= 20 * RTOL[torch.float32]
    assert ck.cinc_logdet(w, 3, 5, unit_diagonal=True, backend="triton").item() == 0.0


def test_unsupported_dtype_names_the_argument():
    w = make_weight(3, 3, torch.float16, DEVICE)
    y = torch.randn(1, 3, 4, 4, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="y: backend 'triton' supports"):
        ck.cinc_conv2d_inverse(y, w, backend="triton")


# Gradients. The interpreter's tl.dot is a numpy matmul, so float64 runs at full precision and gradcheck applies.

OPS = [torch.ops.cinc_triton.forward.default, torch.ops.cinc_triton.inverse.default,
       torch.ops.cinc_triton.inverse_transpose.default, torch.ops.cinc_triton.logdet.default]


def _sample_inputs(requires_grad):
    """(op, args) for every op on two tiny shapes: bias / unit diagonal on and off, k = 2 and 3."""
    g = torch.Generator().manual_seed(11)
    out = []
    for B, C, H, W, k, bias, unit in [(2, 3, 3, 2, 3, True, False), (1, 2, 2, 3, 2, False, True)]:
        for op in OPS:
            w = make_weight(C, k, torch.float64, DEVICE, generator=g).requires_grad_(requires_grad)
            b = torch.randn(C, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(requires_grad)
            x = make_image(B, C, H, W, torch.float64, DEVICE, generator=g).requires_grad_(requires_grad)
            if op is OPS[3]:
                out.append((op, (w, H, W, unit)))
            elif op is OPS[2]:
                out.append((op, (x, w, unit)))
            else:
                out.append((op, (x, w, b if bias else None, unit)))
    return out


def _op_id(v):
    return getattr(v, "__name__", "")


@pytest.mark.parametrize("op,args", _sample_inputs(False), ids=_op_id)
def test_opcheck(op, args):
    """Schema, fake (meta) implementation, autograd registration: torch.library's own consistency checks."""
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("op,args", _sample_inputs(True), ids=_op_id)
def test_gradcheck_float64(op, args):
    # The full numerical Jacobian costs two solves per input entry, minutes in the interpreter for the larger of the
    # two shapes: there gradcheck's fast mode (random projections of the Jacobian) checks the same formulas.
    fast = args[0].numel() > 12
    assert torch.autograd.gradcheck(op, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


def _grads(fn, tensors, seed=5):
    out = fn(*tensors)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype=out.dtype, device=out.device)
    return torch.autograd.grad(out, tensors, gout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("which", ["forward", "inverse", "inverse_transpose", "logdet"])
def test_gradients_match_reference_autograd(which, unit, dtype):
    """The backend's gradients against autograd through the float64 reference (per-dtype tolerance)."""
    g = torch.Generator().manual_seed(21)
    C, H, W, k = 5, 4, 3, 3
    w = make_weight(C, k, dtype, DEVICE, generator=g).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE).requires_grad_()
    x = make_image(2, C, H, W, dtype, DEVICE, generator=g).requires_grad_()
    fast, slow = {
        "forward": (lambda x, w, b: ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend="triton"),
                    lambda x, w, b: reference.forward(x.double(), w.double(), b.double(), unit)),
        "inverse": (lambda y, w, b: ck.cinc_conv2d_inverse(y, w, b, unit_diagonal=unit, backend="triton"),
                    lambda y, w, b: reference.inverse(y.double(), w.double(), b.double(), unit)),
        "inverse_transpose": (lambda g_, w: ck.cinc_conv2d_inverse_transpose(g_, w, unit_diagonal=unit,
                                                                             backend="triton"),
                              lambda g_, w: reference.inverse_transpose(g_.double(), w.double(), unit)),
        "logdet": (lambda w: ck.cinc_logdet(w, H, W, unit_diagonal=unit, backend="triton"),
                   lambda w: reference.logdet(w.double(), H, W, unit)),
    }[which]
    args = {"forward": (x, w, b), "inverse": (x, w, b), "inverse_transpose": (x, w), "logdet": (w,)}[which]
    for got, want in zip(_grads(fast, args), _grads(slow, args)):
        assert got.dtype == dtype
        assert rel_error(got, want) <= 20 * RTOL[dtype]


@pytest.mark.parametrize("unit", [False, True])
def test_masked_weight_entries_get_exactly_zero_gradient(unit):
    g = torch.Generator().manual_seed(2)
    C, k = 5, 3
    w = make_weight(C, k, torch.float64, DEVICE, generator=g).requires_grad_()
    x = make_image(2, C, 4, 5, torch.float64, DEVICE, generator=g)
    mask = reference.weight_mask(C, k, unit, device=DEVICE)
    loss = (ck.cinc_conv2d(x, w, unit_diagonal=unit, backend="triton") ** 2).sum()
    loss = loss + (ck.cinc_conv2d_inverse(x, w, unit_diagonal=unit, backend="triton") ** 2).sum()
    loss = loss + ck.cinc_logdet(w, 4, 5, unit_diagonal=unit, backend="triton")
    (gw,) = torch.autograd.grad(loss, w)
    assert torch.all(gw[mask == 0] == 0)
    assert torch.all(gw[mask == 1] != 0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_compile_fullgraph_matches_eager(layout):
    """The ops are opaque custom ops with fake implementations, so compile traces them in one graph, gradients
    included; the values must be bit-identical to eager."""
    g = torch.Generator().manual_seed(4)
    w = make_weight(6, 3, torch.float32, DEVICE, generator=g).requires_grad_()
    b = torch.randn(6, generator=g).to(DEVICE)
    x = with_layout(make_image(2, 6, 7, 5, torch.float32, DEVICE, generator=g), layout)

    def roundtrip(x, w, b):
        y = ck.cinc_conv2d(x, w, b, backend="triton")
        x_hat = ck.cinc_conv2d_inverse(y * 1.5, w, b, backend="triton")
        return y, x_hat, ck.cinc_logdet(w, 7, 5, backend="triton")

    def loss_and_grad(fn):
        outs = fn(x, w, b)
        loss = sum((o.double() ** 2).sum() for o in outs)
        return outs, torch.autograd.grad(loss, w)

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    (got, got_gw), (want, want_gw) = loss_and_grad(compiled), loss_and_grad(roundtrip)
    for a, e in zip(got + got_gw, want + want_gw):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_layer_runs_on_the_triton_backend():
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    layer = ck.CInCConv2d(6, kernel_size=3, bias=True, backend="triton").to(DEVICE)
    x = make_image(2, 6, 5, 7, torch.float32, DEVICE, generator=g)
    y, logdet = layer(x)
    assert logdet.shape == (2,)
    assert rel_error(layer.inverse(y), x) <= 20 * RTOL[torch.float32]
