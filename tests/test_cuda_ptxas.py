"""What ptxas makes of every CUDA kernel specialisation, for sm_80 and sm_90 (benchmarks/cuda_ptxas.py): no register
spills and no static shared memory over the per-block limit. Needs nvcc, not a GPU."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "cuda_ptxas.py")


def _nvcc():
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return True
    from shutil import which

    return which("nvcc") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _nvcc():
        pytest.skip("no nvcc (CUDA toolkit) on this machine: ptxas cannot report on the CUDA kernels")
    out = tmp_path_factory.mktemp("ptxas")
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out / "cuda_ptxas.csv") as f:
        return list(csv.DictReader(f))


def test_every_specialisation_is_reported(report):
    for arch in ("sm_80", "sm_90"):
        kernels = {r["kernel"] for r in report if r["arch"] == arch}
        assert len([k for k in kernels if k.startswith("wavefront_kernel<")]) == 8, kernels
        assert len([k for k in kernels if k.startswith("forward_kernel<")]) == 4, kernels
        assert len([k for k in kernels if k.startswith("logdet_kernel<")]) == 2, kernels


def test_no_kernel_spills_registers(report):
    spills = [f"{r['arch']} {r['kernel']}: {r['spill_store_bytes']}/{r['spill_load_bytes']} B"
              for r in report if int(r["spill_store_bytes"]) or int(r["spill_load_bytes"])]
    assert not spills, "register spills (stores/loads): " + "; ".join(spills)


def test_static_shared_memory_fits(report):
    for r in report:
        assert int(r["static_smem_bytes"]) <= int(r["smem_limit_bytes"]), r
        assert 0 < int(r["registers"]) <= 255, r
