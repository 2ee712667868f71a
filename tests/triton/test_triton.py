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
    B, C, H, W, k, bias, unit = case
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
