"""The comparison benchmark: ``python -m cinc_kernels bench`` (also ``benchmarks/bench_layers.py``).

Two suites, on one device:

* **layers**: every layer of :data:`cinc_kernels.LAYERS` × backend × shape × dtype: free parameters, forward,
  inverse, log-determinant and forward+backward time, memory, and the reconstruction error
  ``‖inverse(forward(x)) − x‖ / ‖x‖``;
* **inverse_algorithms**: the same CInC weight inverted by our backends, a pure-PyTorch wavefront (one set of ops
  per anti-diagonal) and the paper's sequential raster solve (one pixel at a time, eager PyTorch). (The FInC-style
  launch per diagonal and channel is a GPU baseline of ``benchmarks/bench_gpu.py``.)

Every case is checked for correctness (round trip, log-determinant shape, agreement between inverse algorithms)
before anything is timed; a mismatch raises :class:`CorrectnessError`. Times are medians with the 20th and 80th
percentiles over repeated calls (:mod:`cinc_kernels.harness`: CUDA events on the GPU, ``perf_counter`` on the
CPU), taken in ``rounds`` passes over all cases so that load from elsewhere on a shared machine does not land on one
case only. Results are appended as long-format CSV rows (the harness's schema, :data:`CSV_COLUMNS`) under ``--out``
(default ``runs/bench``; ``benchmarks/results`` only when asked), with a Markdown table and PNG plots beside them.

Weights are the layers' own initialisation moved by ``N(0, (0.1/√fan_in)²)`` noise on every parameter, so every tap
matters and the inverse stays well conditioned (docs/spec.md §1, conditionin

The package's modules: :mod:`.config` (what to run), :mod:`.baselines` (the inverse algorithms ours are compared
with), :mod:`.runner` (check, then time), :mod:`.report` (CSV, Markdown, plots) and :mod:`.cli` (the command line).
"""
from .baselines import sequential_raster_inverse, torch_wavefront_inverse
from .cli import QUICK, main, parse_args
from .config import CHECK_TOLERANCE, CSV_COLUMNS, LAYER_KWARGS, LAYER_OPS, BenchConfig, CorrectnessError, default_device
from .report import markdown_tables, write_results
from .runner import run

__all__ = [
    "CHECK_TOLERANCE",
    "CSV_COLUMNS",
    "LAYER_KWARGS",
    "LAYER_OPS",
    "QUICK",
    "BenchConfig",
    "CorrectnessError",
    "default_device",
    "main",
    "markdown_tables",
    "parse_args",
    "run",
    "sequential_raster_inverse",
    "torch_wavefront_inverse",
    "write_results",
]
