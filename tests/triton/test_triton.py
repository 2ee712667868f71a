"""What only the Triton backend has: diagonals longer than one pixel block, every forward configuration the
autotuner may pick, its dtype limits. The properties every backend shares (values, layouts, dtypes, gradients,
opcheck, compile, errors) run on Triton from ``tests/test_backend_contract.py``, and the layers from
``tests/test_layers.py``, collected by the same ``TRITON_INTERPRET=1`` process (``make test-triton``).

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched on before ``triton``
is first imported: ``make test-triton`` sets TRITON_INTERPRET=1 for its own pytest process, and the guard below
does the same for a by-hand ``pytest tests/triton``. On a GPU, run ``python -m pytest tests/triton`` without
TRITON_INTERPRET: the kernels are compiled.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cinc_kernels as ck  # noqa: E402
import cinc_kernels.triton  # noqa: E402
from cinc_kernels import reference  # noqa: E402
from cinc_kernels.backends import get_backend  # noqa: E402
from tests.cases import RTOL, adjoint_apply, make_image, make_weight, rel_error  # noqa: E402

_WHY_NOT = get_backend("triton").unavailable()
if _WHY_NOT is None and not torch.cuda.is_available() and not cinc_kernels.triton.INTERPRETED:
    _WHY_NOT = "triton was imported before TRITON_INTERPRET=1 was set; run `make test-triton`"
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"Triton backend unavailable: {_WHY_NOT}")

# Compiled kernels run on the GPU at full sizes too; the interpreter (CI, or `make test-triton` on any machine) runs
# the small shapes on CPU tensors.
ON_GPU = torch.cuda.is_available() and not cinc_kernels.triton.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"


def _inputs(case, dtype, seed):
    B, C, H, W, k, bias, _unit = case
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, dtype, DEVICE, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE) if bias else None
    x = make_image(B, C, H, W, dtype, DEVICE, generator=g)
    return w, b, x


def test_diagonals_longer_than_one_pixel_block():
    """min(H, W) = 65 > 64 pixels per block: each diagonal is solved in two chunks, one after the other."""
    w, b, x = _inputs((1, 1, 66, 65, 2, True, False), torch.float32, seed=5)
    y_ref = reference.forward(x.double(), w.double(), b.double())
    assert rel_error(ck.cinc_conv2d(x, w, b, backend="triton"), y_ref) <= RTOL[torch.float32]
    x_hat = ck.cinc_conv2d_inverse(y_ref.float(), w, b, backend="triton")
    assert rel_error(x_hat, x) <= 20 * RTOL[torch.float32]
    u = ck.cinc_conv2d_inverse_transpose(x, w, backend="triton")
    assert rel_error(adjoint_apply(u, w, False), x) <= 20 * RTOL[torch.float32]


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


def test_unsupported_dtype_names_the_argument():
    w = make_weight(3, 3, torch.float16, DEVICE)
    y = torch.randn(1, 3, 4, 4, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="y: backend 'triton' supports"):
        ck.cinc_conv2d_inverse(y, w, backend="triton")


# ------------------------------------------------------------------------------------------------ bias layouts


def _bias_not_contiguous(layout, C, dtype, seed):
    """A bias that is not ``C`` consecutive elements: every other element of a longer vector, or one value expanded
    to ``C`` (stride 0: reading ``C`` elements of its storage would run past its one-element allocation). Made in
    place on the device: a ``.to()`` afterwards would copy it into a contiguous one."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        b = torch.randn(2 * C, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)[::2]
    else:
        b = torch.tensor(0.5, dtype=dtype, device=DEVICE).expand(C)
    assert not b.is_contiguous()
    return b


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_bias_that_is_not_contiguous(layout):
    """Forward and inverse read the bias by value, whatever its strides."""
    w, _, x = _inputs((2, 3, 4, 5, 3, False, False), torch.float32, seed=21)
    b = _bias_not_contiguous(layout, 3, torch.float32, seed=22)
    y_ref = reference.forward(x.double(), w.double(), b.double())
    assert rel_error(ck.cinc_conv2d(x, w, b, backend="triton"), y_ref) <= RTOL[torch.float32]
    x_hat = ck.cinc_conv2d_inverse(y_ref.float(), w, b, backend="triton")
    assert rel_error(x_hat, x) <= 20 * RTOL[torch.float32]


@pytest.mark.parametrize("op", ["forward", "inverse"])
def test_vmap_over_the_bias(op):
    """vmap over the columns of a ``(C, N)`` stack of biases runs the op once per column, on a bias of stride N."""
    w, _, x = _inputs((1, 3, 3, 4, 2, False, False), torch.float32, seed=23)
    biases = torch.randn(3, 2, generator=torch.Generator().manual_seed(24)).to(DEVICE)
    fn, ref, tol = ((ck.cinc_conv2d, reference.forward, RTOL[torch.float32]) if op == "forward" else
                    (ck.cinc_conv2d_inverse, reference.inverse, 20 * RTOL[torch.float32]))
    got = torch.func.vmap(lambda b: fn(x, w, b, backend="triton"), in_dims=1)(biases)
    assert got.shape == (2, *x.shape)
    for n in range(2):
        assert rel_error(got[n], ref(x.double(), w.double(), biases[:, n].double())) <= tol, n


# ------------------------------------------------------------------------------------------------ offsets and sizes


@pytest.mark.skipif(ON_GPU, reason="a view of a CPU file mapping, which the interpreter reads and a GPU cannot")
@pytest.mark.parametrize("op", ["forward", "inverse", "inverse_transpose"])
def test_image_offsets_past_2_31_elements(op, tmp_path):
    """A view whose channel stride is 2**30 elements: channel 2 starts 2**31 elements past channel 0, where an int32
    offset wraps. Its storage maps a sparse file of 2**32 elements, of which only the pages touched take memory or
    disk; the view starts 2**31 elements in, so a wrapped offset reads zeros from the same mapping (a wrong result)
    rather than faulting."""
    C, H, W = 3, 2, 3
    path = tmp_path / "image.bin"
    storage = torch.from_file(str(path), shared=True, size=2**31 + (C - 1) * 2**30 + H * W, dtype=torch.float32)
    path.unlink()  # the mapping stays; nothing is left on disk
    x = storage.as_strided((1, C, H, W), (C * 2**30, 2**30, W, 1), storage_offset=2**31)
    g = torch.Generator().manual_seed(25)
    x.copy_(make_image(1, C, H, W, torch.float32, generator=g))
    w = make_weight(C, 2, torch.float32, generator=g)
    b = torch.randn(C, generator=g)
    x64, w64, b64 = x.double(), w.double(), b.double()
    if op == "forward":
        assert rel_error(ck.cinc_conv2d(x, w, b, backend="triton"), reference.forward(x64, w64, b64)) <= RTOL[
            torch.float32]
    elif op == "inverse":
        x_hat = ck.cinc_conv2d_inverse(x, w, b, backend="triton")
        assert rel_error(reference.forward(x_hat.double(), w64, b64), x64) <= 20 * RTOL[torch.float32]
    else:
        u = ck.cinc_conv2d_inverse_transpose(x, w, backend="triton")
        assert rel_error(adjoint_apply(u, w, False), x64) <= 20 * RTOL[torch.float32]


def test_weights_the_kernels_cannot_index_are_refused():
    """Weight offsets are int32: a weight of 2**31 elements or more is refused naming it, before anything is copied
    (an expanded zero here: nothing that size is allocated)."""
    C, k = 6621, 7
    assert C * C * k * k >= 2**31
    w = torch.zeros((), device=DEVICE).expand(C, C, k, k)
    x = torch.zeros((), device=DEVICE).expand(1, C, 1, 1)
    with pytest.raises(ValueError, match=r"^weight: .*2\*\*31"):
        ck.cinc_conv2d(x, w, backend="triton")


@pytest.mark.skipif(ON_GPU, reason="on a GPU the channel limit refuses this weight first")
def test_wavefront_refuses_weights_and_images_it_cannot_index():
    C, k = 6621, 7
    w = torch.zeros((), device=DEVICE).expand(C, C, k, k)
    y = torch.zeros((), device=DEVICE).expand(1, C, 1, 1)
    with pytest.raises(ValueError, match=r"^weight: .*2\*\*31"):
        ck.cinc_conv2d_inverse(y, w, backend="triton")
    # H + W - 1 anti-diagonals are counted in int32.
    wide = torch.zeros((), device=DEVICE).expand(1, 1, 1, 2**31)
    with pytest.raises(ValueError, match=r"^g: .*H \+ W"):
        ck.cinc_conv2d_inverse_transpose(wide, make_weight(1, 1, torch.float32, DEVICE), backend="triton")


def test_autotune_key_holds_every_size_that_changes_the_grid():
    from cinc_kernels.triton import kernels

    assert {"B", "C", "H", "W", "ksize", "has_bias"} <= set(kernels.cinc_forward_gemm_kernel.keys)


# ------------------------------------------------------------------------------------------------ centre inverse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_centre_inverse_matches_the_float64_inverse(dtype):
    """L⁻¹ from the kernel, in the accumulation dtype, against torch's float64 inverse of the masked centre tap. The
    entries the mask drops are NaN (and the whole diagonal with a unit diagonal): the kernel must never read them.
    C = 17 needs a 32-wide tile."""
    from cinc_kernels.triton import ops

    g = torch.Generator().manual_seed(26)
    for C, unit in [(1, False), (5, True), (17, False)]:
        w = make_weight(C, 3, torch.float64, generator=g)
        L = w[:, :, 2, 2].tril(-1) + (torch.eye(C, dtype=torch.float64) if unit else w[:, :, 2, 2].diag().diag())
        dropped = torch.ones(C, C, dtype=torch.bool).triu(0 if unit else 1)
        w[:, :, 2, 2] = w[:, :, 2, 2].masked_fill(dropped, float("nan"))
        got = ops.centre_inverse(w.to(dtype=dtype, device=DEVICE).contiguous(), unit)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        want = torch.linalg.inv(L)
        assert rel_error(got, want) <= RTOL[dtype], (C, unit)


def test_inverse_launches_two_kernels_and_no_torch_compute(monkeypatch):
    """The inverse's launcher on the GPU path (no look at the weight's values): two Triton launches (L⁻¹ and the
    wavefront) and, from torch, only the two output allocations, so nothing synchronises with the host and the call
    can be captured in a CUDA graph."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cinc_kernels.triton import kernels, ops

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.paused = [], False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.paused:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    recorder, launched = Recorder(), []

    class Counted:
        """A kernel that records its launches; what the interpreter does with torch inside one is not the launcher's."""

        def __init__(self, kernel):
            self.kernel, self.arg_names = kernel, kernel.arg_names

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(self.kernel)
                recorder.paused = True
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    recorder.paused = False
            return launch

    for name in ("_cinc_centre_inverse_kernel", "_cinc_inverse_wavefront_kernel"):
        monkeypatch.setattr(kernels, name, Counted(getattr(kernels, name)))
    monkeypatch.setattr(ops, "_singular_check_is_free", lambda weight: False)
    w, b, y = _inputs((2, 3, 4, 5, 3, True, False), torch.float32, seed=27)
    with recorder:
        x = ops._wavefront(y, w, b, False, adjoint=False)
    assert [k.__name__ for k in launched] == ["_cinc_centre_inverse_kernel", "_cinc_inverse_wavefront_kernel"]
    assert recorder.ops == ["aten.empty.memory_format"] * 2
    x_ref = reference.inverse(y.double(), w.double(), b.double())
    assert rel_error(x, x_ref) <= 20 * RTOL[torch.float32]


@pytest.mark.gpu_smoke
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_inverse_and_adjoint_run_in_a_cuda_graph():
    """With torch's sync debug mode set to error, the inverse and its adjoint are captured in a CUDA graph and its
    replay solves the system."""
    w, b, y = _inputs((2, 12, 9, 8, 3, True, False), torch.float32, seed=28)
    ck.cinc_conv2d_inverse(y, w, b, backend="triton")  # compile outside the capture
    ck.cinc_conv2d_inverse_transpose(y, w, backend="triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            x = ck.cinc_conv2d_inverse(y, w, b, backend="triton")
            u = ck.cinc_conv2d_inverse_transpose(y, w, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x.zero_()
    u.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(x, reference.inverse(y.double(), w.double(), b.double())) <= 20 * RTOL[torch.float32]
    assert rel_error(adjoint_apply(u, w, False), y) <= 20 * RTOL[torch.float32]
