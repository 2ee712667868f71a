"""Builds ``cinc_kernels._C``: the C++ CPU kernels, plus the CUDA kernels when a toolkit is there.

Knobs (environment variables):
  CINC_CUDA=auto|0|1       auto (default): build the CUDA kernels when torch has CUDA and a toolkit is found;
                           1: require them (fail if impossible); 0: CPU only.
  CUDA_HOME                the toolkit root; found by itself otherwise (see find_cuda_home).
  TORCH_CUDA_ARCH_LIST     the GPU architectures; "8.0;9.0" when no GPU is visible, the visible GPU's otherwise.
  CINC_DEBUG=1             -O0 -g builds.
The build writes cinc_kernels/_build_info.json (torch, CUDA, archs, compiler), printed by ``python -m cinc_kernels info``.
"""
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    """The CUDA toolkit root, or None.

    torch guesses the root as the parent of the ``nvcc`` on PATH, which is wrong when that ``nvcc`` is a wrapper
    script (as on our build machines); so look at the usual places and keep only a real toolkit.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if _is_toolkit(root):
            return os.path.realpath(root)
    return None


def want_cuda(cuda_home):
    mode = os.environ.get("CINC_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"CINC_CUDA must be auto, 0 or 1, got {mode!r}")
    import torch

    possible = torch.version.cuda is not None and cuda_home is not None
    if mode == "1" and not possible:
        why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit was found (set CUDA_HOME)"
        sys.exit(f"CINC_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return possible and mode != "0"


cuda_home = find_cuda_home()
if cuda_home and not os.environ.get("CUDA_HOME"):
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402

with_cuda = want_cuda(cuda_home)
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def nvidia_pip_includes():
    """Headers of the pip ``nvidia`` packages (cuBLAS & co.), which ATen/cuda/CUDAContext.h includes."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return found


def compiler_version(cmd):
    """The line of ``cmd --version`` that names the version (nvcc prints it last, gcc first)."""
    try:
        lines = subprocess.run([cmd, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    release = [line for line in lines if "release" in line]
    return (release or lines or [None])[0]


def write_build_info():
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_built": with_cuda,
        "cuda_home": cuda_home if with_cuda else None,
        "nvcc": compiler_version(os.path.join(cuda_home, "bin", "nvcc")) if with_cuda else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cxx": compiler_version(os.environ.get("CXX", "c++")),
        "python": sys.version.split()[0],
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(ROOT, "cinc_kernels", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def extension():
    debug = os.environ.get("CINC_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = [os.path.join("csrc", "cinc_ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # No FMA contraction: the CPU kernels' vectorised and scalar paths then round identically (bitwise-equal results
    # whichever CPU features are present).
    extra = {"cxx": opt + ["-fopenmp", "-ffp-contract=off"]}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        include_dirs += nvidia_pip_includes()
        extra["nvcc"] = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension("cinc_kernels._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                             extra_link_args=["-fopenmp"], define_macros=[("CINC_WITH_CUDA", "1")])
    return CppExtension("cinc_kernels._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                        extra_link_args=["-fopenmp"])


write_build_info()
setup(
    name="cinc_kernels",
    packages=find_packages(include=["cinc_kernels", "cinc_kernels.*"]),
    package_data={"cinc_kernels": ["_build_info.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
