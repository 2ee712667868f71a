"""Builds ``cinc_kernels._C``: the C++ CPU kernels, plus the CUDA kernels when a toolkit is there.

Knobs (environment variables):
  CINC_CUDA=auto|0|1       auto (default): build the CUDA kernels when torch has CUDA and a toolkit is found;
                           1: require them (fail if impossible); 0: CPU only.
  CUDA_HOME                the toolkit root; found by itself otherwise (see find_cuda_home).
  TORCH_CUDA_ARCH_LIST     the GPU architectures; by default 8.0;8.6;8.9;9.0+PTX plus those of the visible GPUs,
                           less what this nvcc cannot compile. The +PTX lets newer GPUs JIT-compile the kernels.
  CINC_DEBUG=1             -O0 -g builds.
  CINC_BUILD_LOG=PATH      quiet build (what `make build` uses): the compiler command lines and messages go to PATH,
                           the terminal shows one line per compiled file, and the log's end if the build fails.
The build writes cinc_kernels/_build_info.json (torch, CUDA, archs, compiler, OpenMP), printed by
``python -m cinc_kernels info`` and checked at import against the running torch.

The extension uses only the stable Python C API (it registers its ops through TORCH_LIBRARY, not pybind11), so the
wheel is tagged ``cp310-abi3``: one wheel per platform and torch version serves every Python from 3.10 on.
"""
import contextlib
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = ("8.0", "8.6", "8.9", "9.0+PTX")
# Oldest CPython whose stable ABI the extension is compiled against (0x030A0000 = 3.10).
LIMITED_API = ("cp310", "0x030A0000")


# ninja's status line before each command torch has it run verbosely: "[3/9] c++ ... -c /abs/csrc/cpu/x.cpp -o ...".
NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] .* -c (\S+)(?: |$)")


@contextlib.contextmanager
def quiet_output(log_path, mode="a"):
    """Sends everything this process and its children (ninja, the compilers) write to stdout and stderr to
    ``log_path`` (opened with ``mode``); the terminal gets one ``[i/n] compiling file`` line per compiled file and,
    if the block fails, the last 100 lines of the log and its path.

    The redirection is of the file descriptors, not of ``sys.stdout``: torch runs ninja with the process's fd 1.
    """
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    terminal = os.fdopen(os.dup(saved_out), "w")
    tail = []

    def pump():
        with open(log_path, mode) as log, os.fdopen(read_end, errors="replace") as pipe:
            for line in pipe:
                log.write(line)
                log.flush()
                tail.append(line)
                del tail[:-100]
                step = NINJA_STEP.match(line)
                if step:
                    done, total, source = step.groups()
                    terminal.write(f"  [{done}/{total}] compiling {os.path.relpath(source, ROOT)}\n")
                    terminal.flush()
                elif line.startswith("ninja: no work to do"):
                    terminal.write("  nothing to recompile\n")
                    terminal.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    failed = True
    try:
        yield
        failed = False
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Closing the pipe's last write ends lets the reader finish the log.
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        reader.join()
        if failed:
            terminal.write("".join(tail))
            terminal.write(f"\nthe build failed; the whole compiler output is in {log_path}\n")
        terminal.close()


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



def nvcc_archs(home):
    """The ``compute_XY`` targets this nvcc accepts, as ``"X.Y"``; ``None`` when it cannot say."""
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = {f"{int(m[:-1])}.{m[-1]}" for m in (line.strip()[len("compute_"):] for line in out.splitlines()
                                                 if line.strip().startswith("compute_")) if m.isdigit()}
    return found or None


def default_arch_list(home):
    """``DEFAULT_ARCHS`` plus the visible GPUs' archs, less those this nvcc cannot compile (``"8.0;...;9.0+PTX"``)."""
    wanted = list(DEFAULT_ARCHS)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            arch = f"{major}.{minor}"
            if not any(a.split("+")[0] == arch for a in wanted):
                wanted.append(arch)
    supported = nvcc_archs(home)
    if supported is not None:
        kept = [a for a in wanted if a.split("+")[0] in supported]
        if kept and not any(a.endswith("+PTX") for a in kept):
            # An older nvcc without 9.0: PTX of the newest arch it has still reaches the GPUs after it.
            newest = max(kept, key=lambda a: tuple(int(v) for v in a.split(".")))
            kept[kept.index(newest)] = newest + "+PTX"
        wanted = kept or wanted
    return ";".join(wanted)


with_cuda = want_cuda(cuda_home)
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(cuda_home)

BUILD_LOG = os.environ.get("CINC_BUILD_LOG")
# Importing cpp_extension warns about the CUDA runtime on machines without one: part of the log, not the terminal.
with quiet_output(BUILD_LOG, "w") if BUILD_LOG else contextlib.nullcontext():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension


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


def cxx_command():
    """The C++ compiler setuptools will call on this platform (``CXX`` overrides, as for distutils)."""
    return (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()[0]


def compiler_accepts(flags, source="int main() { return 0; }\n"):
    """Whether ``cxx_command()`` compiles and links ``source`` with ``flags`` (how flags are chosen per compiler)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            done = subprocess.run([cxx_command(), *flags, src, "-o", os.path.join(tmp, "probe")],
                                  capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0


OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def cpu_flags():
    """(compile flags, link flags, OpenMP on?) for this compiler.

    ``at::parallel_for`` in ATen's headers runs serially unless the extension is compiled with OpenMP; compilers
    that lack it (Apple clang without libomp) build a correct, single-threaded extension. FMA contraction is switched
    off so that the vectorised and scalar paths of the CPU kernels round identically (bitwise-equal results whichever
    CPU features are present); MSVC's /fp:strict is its way of saying the same.
    """
    if sys.platform == "win32":
        return ["/openmp", "/fp:strict"], [], True
    compile_flags, link_flags = [], []
    if compiler_accepts(["-ffp-contract=off"]):
        compile_flags.append("-ffp-contract=off")
    openmp = compiler_accepts(["-fopenmp"], OPENMP_PROBE)
    if openmp:
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return compile_flags, link_flags, openmp


CPU_COMPILE_FLAGS, CPU_LINK_FLAGS, WITH_OPENMP = cpu_flags()


def write_build_info(package_dirs):
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_built": with_cuda,
        "cuda_home": cuda_home if with_cuda else None,
        "nvcc": compiler_version(os.path.join(cuda_home, "bin", "nvcc")) if with_cuda else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cxx": compiler_version(cxx_command()),
        "cxx_flags": CPU_COMPILE_FLAGS,
        "openmp": WITH_OPENMP,
        "python_abi": f"{LIMITED_API[0]}-abi3",
        "python": sys.version.split()[0],
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for package_dir in package_dirs:
        os.makedirs(package_dir, exist_ok=True)
        with open(os.path.join(package_dir, "_build_info.json"), "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")


class BuildExtensionWithInfo(BuildExtension):
    """Writes _build_info.json beside the extension it builds (and only then: an sdist must not rewrite it)."""

    def run(self):
        with quiet_output(BUILD_LOG) if BUILD_LOG else contextlib.nullcontext():
            super().run()
        # In place (and editable installs, which import from the source tree) beside the source; otherwise into the
        # build tree the wheel is packed from, leaving the checkout's own build record alone.
        in_source = self.inplace or getattr(self, "editable_mode", False)
        write_build_info([os.path.join(ROOT if in_source else self.build_lib, "cinc_kernels")])


def extension():
    debug = os.environ.get("CINC_DEBUG") == "1"
    if sys.platform == "win32":
        opt = ["/Od", "/Zi"] if debug else ["/O2"]
    else:
        opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = [os.path.join("csrc", "cinc_ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": opt + CPU_COMPILE_FLAGS}
    common = dict(include_dirs=include_dirs, extra_compile_args=extra, extra_link_args=CPU_LINK_FLAGS,
                  py_limited_api=True)
    macros = [("Py_LIMITED_API", LIMITED_API[1])]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        include_dirs += nvidia_pip_includes()
        extra["nvcc"] = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension("cinc_kernels._C", sources, define_macros=macros + [("CINC_WITH_CUDA", "1")], **common)
    return CppExtension("cinc_kernels._C", sources, define_macros=macros, **common)


setup(
    name="cinc_kernels",
    packages=find_packages(include=["cinc_kernels", "cinc_kernels.*"]),
    package_data={"cinc_kernels": ["_build_info.json", "py.typed"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtensionWithInfo.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": LIMITED_API[0]}},
)
