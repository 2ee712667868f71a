"""benchmarks/finc_baseline.py, the FInC-algorithm baseline of the GPU benchmark, checked on the CPU under Triton's
interpreter (in a child process: TRITON_INTERPRET must be set before triton is imported): it inverts FInC's layer
(the CInC convolution with a four-group block-diagonal weight and a unit diagonal) as the float64 reference does, in
FInC's (H + W - 1) · ⌈C/4⌉ launches."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys
import torch
sys.path.insert(0, "benchmarks")
import finc_baseline as fb
from cinc_kernels import reference

class Counting:  # counts the launches of a Triton kernel (kernel[grid](...))
    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0
    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]

out = []
for n, (B, C, H, W, k, dtype, with_bias) in enumerate(json.loads(sys.argv[1])):
    g = torch.Generator().manual_seed(n)
    w = fb.finc_weight(torch.randn(C, C, k, k, generator=g, dtype=torch.float64) * 0.3 / k)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64) if with_bias else None
    y = reference.forward(x, w, bias, True)
    counter = fb._finc_group_channel_kernel = Counting(fb._finc_group_channel_kernel)
    t = getattr(torch, dtype)
    got = fb.finc_inverse(y.to(t), w.to(t), None if bias is None else bias.to(t)).double()
    fb._finc_group_channel_kernel = counter.kernel
    error = ((got - x).norm() / x.norm()).item()
    out.append({"error": error, "launches": counter.count, "expected": fb.launches_per_call(C, H, W)})
print(json.dumps(out))
"""

# (B, C, H, W, k, dtype, bias): groups of 2, 1, 1, 1 channels (C = 5: two launches per diagonal, the smaller groups
# idle in the second) and of 1 each (C = 4); H ≠ W; k = 2 and 3.
CASES = [(1, 5, 3, 4, 2, "float64", True), (2, 4, 2, 3, 3, "float32", False)]
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], check=False, cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n", range(len(CASES)))
def test_finc_baseline_inverts_finc_layer(results, n):
    assert results[n]["error"] <= TOLERANCE[CASES[n][5]], (CASES[n], results[n])


@pytest.mark.parametrize("n", range(len(CASES)))
def test_finc_baseline_launches_once_per_diagonal_and_group_channel(results, n):
    _, C, H, W, _, _, _ = CASES[n]
    assert results[n]["launches"] == results[n]["expected"] == (H + W - 1) * -(-C // 4), (CASES[n], results[n])


def test_finc_weight_keeps_four_diagonal_blocks_below_the_unit_diagonal():
    import importlib.util

    spec = importlib.util.spec_from_file_location("finc_baseline", os.path.join(ROOT, "benchmarks", "finc_baseline.py"))
    assert spec is not None and spec.loader is not None
    fb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fb)
    C, k = 10, 3
    w = fb.finc_weight(torch.ones(C, C, k, k, dtype=torch.float64))
    assert fb.group_sizes(C) == [3, 3, 2, 2]
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    same_group = group[:, None] == group[None, :]
    off_centre = w[:, :, 0, 0]
    assert torch.equal(off_centre != 0, same_group)
    centre = w[:, :, k - 1, k - 1]
    assert torch.equal(centre != 0, same_group & torch.ones(C, C, dtype=torch.bool).tril(-1))
