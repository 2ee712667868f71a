"""What ptxas and the machine code make of every CUDA kernel specialisation, for sm_80 and sm_90 (tools/cuda_ptxas.py):
no register spills, no static shared memory over the per-block limit, and no generic loads in the wavefront kernels.
Needs nvcc (and cuobjdump, which ships with triton), not a GPU."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "cuda_ptxas.py")


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
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], capture_output=True, text=True, timeout=1800,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out / "cuda_ptxas.csv") as f:
        return list(csv.DictReader(f))


def test_every_specialisation_is_reported(report):
    for arch in ("sm_80", "sm_90"):
        kernels = {r["kernel"] for r in report if r["arch"] == arch}
        assert len([k for k in kernels if k.startswith("wavefront_kernel<")]) == 20, kernels
        assert len([k for k in kernels if k.startswith("wavefront_coefficients_kernel<")]) == 4, kernels
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


def test_wavefront_kernels_load_shared_memory_as_shared(report):
    """Every load of the sm_90 wavefront kernels names its memory: LDS for the ring, the partial sums and the
    coefficient copy (the template parameters fix which pointer is shared), LDG for global memory; none is a generic
    LD that the hardware must resolve at run time, and none is a local-memory LDL (an array indexed at run time). The
    hot loop's ring and coefficient reads are 128-bit (LDS.128). Generic stores are allowed: they are the cluster
    kernels' writes into other blocks' shared memory (distributed shared memory)."""
    if any(r["generic_loads"] == "-1" for r in report):
        pytest.skip("no cuobjdump (the CUDA toolkit's or triton's): no machine code to read")
    wavefront = [r for r in report if r["arch"] == "sm_90" and r["kernel"].startswith("wavefront")]
    assert len(wavefront) == 24
    for r in wavefront:
        assert int(r["generic_loads"]) == 0, f"{r['kernel']}: {r['generic_loads']} generic loads (LD)"
        assert int(r["local_loads"]) == 0 and int(r["local_stores"]) == 0, f"{r['kernel']}: local memory"
        if r["kernel"].startswith("wavefront_kernel<"):
            assert int(r["shared_vector_loads"]) >= 2, f"{r['kernel']}: no 128-bit shared loads"
            assert (int(r["generic_stores"]) > 0) == r["kernel"].endswith("cluster>"), r
