"""Every available backend against the float64 reference on a few random shapes, values and forward-mode tangents:
``python -m cinc_kernels check``."""
from __future__ import annotations

import torch

from . import functional as fn
from . import reference
from .backends import available_backends
from .contract import OP_NAMES
from .testing import make_image, make_weight, op_arguments, op_function, rel_error

# (B, C, H, W, k): odd sizes, H ≠ W, a 1×1 image, the paper's k = 3.
SHAPES = [(2, 3, 5, 7, 3), (1, 12, 9, 9, 3), (3, 1, 1, 1, 2), (2, 8, 6, 4, 5)]
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


def _device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu")


def run(verbose: bool = True) -> bool:
    """Returns True when every backend matches the reference; prints one line per backend and op."""
    g = torch.Generator().manual_seed(0)
    ok = True
    for backend in available_backends():
        if backend == "reference":
            continue
        # Listed as available without a GPU only under TRITON_INTERPRET=1: then it runs on CPU tensors.
        device = _device_for(backend)
        for dtype in (torch.float32, torch.float64):
            worst = {op: 0.0 for op in OP_NAMES}
            for B, C, H, W, k in SHAPES:
                w = make_weight(C, k, dtype, device, generator=g)
                b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
                x = make_image(B, C, H, W, dtype, device, generator=g)
                y_ref = reference.forward(x.double(), w.double(), b.double())
                results = {
                    "forward": (fn.cinc_conv2d(x, w, b, backend=backend), y_ref),
                    "inverse": (fn.cinc_conv2d_inverse(y_ref.to(dtype), w, b, backend=backend), x.double()),
                    "inverse_transpose": (
                        fn.cinc_conv2d_inverse_transpose(x, w, backend=backend),
                        reference.inverse_transpose(x.double(), w.double()),
                    ),
                    "logdet": (fn.cinc_logdet(w, H, W, backend=backend), reference.logdet(w.double(), H, W)),
                }
                for op, (got, want) in results.items():
                    worst[op] = max(worst[op], rel_error(got, want))
            for op, err in worst.items():
                passed = err <= TOLERANCE[dtype]
                ok &= passed
                if verbose:
                    status = "ok  " if passed else "FAIL"
                    print(f"  {status} {backend:<8} {str(dtype)[6:]:<8} {op:<18} max rel. error {err:.1e}")
        for op, err in _forward_ad_errors(backend, device, g).items():
            passed = err <= TOLERANCE[torch.float64]
            ok &= passed
            if verbose:
                status = "ok  " if passed else "FAIL"
                print(f"  {status} {backend:<8} {'jvp f64':<8} {op:<18} max rel. error {err:.1e}")
    return ok


def _forward_ad_errors(backend: str, device: torch.device, generator: torch.Generator) -> dict[str, float]:
    """Forward-mode AD (``torch.func.jvp``, a tangent on every tensor argument) of each op against the reference's,
    float64 on the first two shapes. A backend whose ops drop the tangent shows up as a relative error of 1."""
    worst: dict[str, float] = {}
    for B, C, H, W, k in SHAPES[:2]:
        w = make_weight(C, k, torch.float64, device, generator=generator)
        dw = make_weight(C, k, torch.float64, device, generator=generator)
        b, db = (torch.randn(C, generator=generator, dtype=torch.float64).to(device) for _ in range(2))
        x, dx = (make_image(B, C, H, W, torch.float64, device, generator=generator) for _ in range(2))
        for op in OP_NAMES:
            primals = tuple(t for t in op_arguments(op, w, b, x) if t is not None)
            tangents = tuple(t for t in op_arguments(op, dw, db, dx) if t is not None)
            try:
                got = torch.func.jvp(op_function(op, backend, height=H, width=W), primals, tangents)[1]
            except (RuntimeError, NotImplementedError):
                worst[op] = float("inf")
                continue
            want = torch.func.jvp(op_function(op, "reference", height=H, width=W),
                                  tuple(t.cpu() for t in primals), tuple(t.cpu() for t in tangents))[1]
            worst[op] = max(worst.get(op, 0.0), rel_error(got, want))
    return worst
