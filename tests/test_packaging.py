"""How the package installs: the sdist's contents, the import-time torch check, the GPU arch check, the warned
fallbacks, the optional dependencies, and (with ``CINC_TEST_INSTALL=1``, as ``make test-install`` runs it) a wheel
and an sdist installed into fresh virtual environments and checked from outside the repository.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import runpy
import subprocess
import sys
import tarfile
import types
import warnings

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import _extension, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_files(*paths: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted(out.split())


def _build_sdist(dest) -> str:
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--formats=gztar", "-d", str(dest)], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "CINC_CUDA": "0"})
    (path,) = glob.glob(os.path.join(str(dest), "cinc_kernels-*.tar.gz"))
    return path


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("the sdist is compared against `git ls-files`, and this copy is not a git checkout")
    return _build_sdist(tmp_path_factory.mktemp("sdist"))


def test_sdist_ships_every_source_and_header(sdist):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    shipped = {name[len(top) + 1:] for name in names}
    missing = [path for path in _git_files("csrc", "cinc_kernels", "tests") if path not in shipped]
    assert not missing, f"the sdist lacks {missing}"
    for required in ("setup.py", "pyproject.toml", "MANIFEST.in", "cinc_kernels/py.typed"):
        assert required in shipped
    # The packager's build record and binaries stay out: the sdist is built anew for the installing torch.
    assert not [n for n in shipped if n.endswith((".so", ".pyd", ".o", "_build_info.json"))]


# --------------------------------------------------------------------------------------------------------------
# the torch the extension was built with


def test_a_different_build_torch_is_refused_naming_both_versions_and_the_fix():
    with pytest.raises(_extension.TorchMismatchError) as err:
        _extension.check_torch_version({"torch": "2.11.0+cu126"}, "2.14.1+cu130")
    message = str(err.value)
    assert "2.11.0+cu126" in message and "2.14.1+cu130" in message
    assert "--no-build-isolation" in message
    assert isinstance(err.value, ImportError)


def test_the_same_build_torch_and_an_unbuilt_checkout_pass():
    _extension.check_torch_version({"torch": torch.__version__}, torch.__version__)
    _extension.check_torch_version({}, torch.__version__)


def test_load_refuses_before_loading_the_library(monkeypatch):
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch": "0.0.1"})
    monkeypatch.delenv(_extension.SKIP_ENV, raising=False)
    imported = []
    monkeypatch.setattr(importlib, "import_module", lambda name: imported.append(name))
    with pytest.raises(_extension.TorchMismatchError, match="0.0.1"):
        _extension.load()
    assert imported == []


def test_build_info_records_the_build():
    info = ck.build_info()
    if not info:
        pytest.skip("the extension is not built in this checkout (no _build_info.json)")
    assert info["torch"] == torch.__version__
    assert info["python_abi"] == "cp310-abi3"
    assert isinstance(info["openmp"], bool) and isinstance(info["cxx_flags"], list)
    if info["cuda_built"]:
        assert _extension.parse_archs(info["cuda_archs"]), info["cuda_archs"]


# --------------------------------------------------------------------------------------------------------------
# GPU architectures


def test_parse_archs():
    assert _extension.parse_archs("8.0;8.6;8.9;9.0+PTX") == [(8, 0, False), (8, 6, False), (8, 9, False),
                                                              (9, 0, True)]
    assert _extension.parse_archs("7.5 9.0a") == [(7, 5, False), (9, 0, False)]
    assert _extension.parse_archs("Ampere;;") == []
    assert _extension.parse_archs(None) == []


@pytest.mark.parametrize("capability,covered", [
    ((8, 0), True),    # A100: SASS 8.0
    ((8, 6), True),    # RTX 30 / A10: SASS 8.6
    ((8, 7), True),    # Orin: SASS 8.6 runs on 8.7
    ((8, 9), True),    # L4 / RTX 40: SASS 8.9
    ((9, 0), True),    # H100 / H200
    ((10, 0), True),   # B200: the 9.0 PTX, JIT-compiled
    ((12, 0), True),   # RTX 50: the 9.0 PTX
    ((7, 5), False),   # T4: older than everything built
    ((7, 0), False),   # V100
])
def test_default_archs_cover(capability, covered):
    assert _extension.archs_cover(_extension.parse_archs("8.0;8.6;8.9;9.0+PTX"), capability) is covered


@pytest.fixture(scope="module")
def setup_namespace():
    """setup.py's functions, from running it with ``--version`` (which builds nothing)."""
    argv, environ = sys.argv, dict(os.environ)
    sys.argv = ["setup.py", "--version"]
    try:
        return runpy.run_path(os.path.join(ROOT, "setup.py"))
    finally:
        # setup.py sets CUDA_HOME and TORCH_CUDA_ARCH_LIST for the build it would run.
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)


@pytest.mark.parametrize("nvcc,gpus,expected", [
    ({"7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "12.0"}, [], "8.0;8.6;8.9;9.0+PTX"),
    ({"7.5", "8.0", "8.6", "8.9", "9.0"}, [(7, 5)], "8.0;8.6;8.9;9.0+PTX;7.5"),
    ({"8.0", "8.6", "8.9", "9.0", "10.0"}, [(9, 0), (8, 0)], "8.0;8.6;8.9;9.0+PTX"),
    ({"7.5", "8.0", "8.6"}, [], "8.0;8.6+PTX"),  # CUDA 11.1–11.7: no 8.9 or 9.0, so the PTX moves to 8.6
    (None, [], "8.0;8.6;8.9;9.0+PTX"),  # an nvcc that cannot list its archs: the default as is
])
def test_default_arch_list(setup_namespace, nvcc, gpus, expected, monkeypatch):
    props = [types.SimpleNamespace(major=major, minor=minor) for major, minor in gpus]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (props[i].major, props[i].minor))
    namespace = setup_namespace["default_arch_list"].__globals__
    monkeypatch.setitem(namespace, "nvcc_archs", lambda home: nvcc)
    assert namespace["default_arch_list"]("/unused") == expected
    archs = _extension.parse_archs(expected)
    assert all(_extension.archs_cover(archs, gpu) for gpu in gpus)


def test_sass_without_ptx_does_not_cover_a_newer_major():
    assert not _extension.archs_cover(_extension.parse_archs("8.0;9.0"), (10, 0))
    assert not _extension.archs_cover(_extension.parse_archs("8.6"), (8, 0))


def _fake_gpu(monkeypatch, major, minor, name, archs):
    props = types.SimpleNamespace(major=major, minor=minor, name=name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(_extension, "_BUILT_ARCHS_TEXT", archs)
    monkeypatch.setattr(_extension, "_BUILT_ARCHS", _extension.parse_archs(archs))
    monkeypatch.setattr(_extension, "_device_verdicts", {})
    monkeypatch.setattr(_extension, "_warned", set())


def _runnable_cuda_backend(monkeypatch):
    """The registered "cuda" backend as if the kernels were built and a GPU visible (only selection is tested)."""
    fake = dataclasses.replace(backends.get_backend("cuda"), ops={"inverse": lambda *a: None},
                               unavailable=lambda: None)
    monkeypatch.setitem(backends._REGISTRY, "cuda", fake)
    monkeypatch.setitem(backends._REGISTRY, "triton", dataclasses.replace(
        backends.get_backend("triton"), unavailable=lambda: "not in this test"))


def test_auto_skips_cuda_for_a_gpu_outside_the_arch_list_and_warns_once(monkeypatch):
    _fake_gpu(monkeypatch, 7, 5, "Tesla T4", "8.0;8.6;8.9;9.0+PTX")
    _runnable_cuda_backend(monkeypatch)
    device = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning) as record:
        chosen = backends.select("auto", "inverse", device, torch.float32)
    assert chosen.name == "torch"
    message = str(record[0].message)
    assert "Tesla T4" in message and "7.5" in message and "8.0;8.6;8.9;9.0+PTX" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("auto", "inverse", device, torch.float32).name == "torch"
    with pytest.raises(RuntimeError, match="Tesla T4"):
        backends.select("cuda", "inverse", device, torch.float32)


def test_auto_uses_cuda_on_a_covered_gpu(monkeypatch):
    _fake_gpu(monkeypatch, 10, 0, "NVIDIA B200", "8.0;8.6;8.9;9.0+PTX")
    _runnable_cuda_backend(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("auto", "inverse", torch.device("cuda", 0), torch.float32).name == "cuda"


# --------------------------------------------------------------------------------------------------------------
# a compiled extension that did not load


def test_auto_falls_back_with_one_warning_carrying_the_load_error(monkeypatch):
    monkeypatch.setattr(_extension, "ERROR", "undefined symbol: _ZN3c104cuda9SetDevice")
    monkeypatch.setattr(_extension, "_warned", set())
    x = torch.randn(2, 3, 4, 5)
    w = torch.randn(3, 3, 2, 2)
    w[:, :, -1, -1] += 3 * torch.eye(3)
    with pytest.warns(RuntimeWarning) as record:
        chosen = backends.select("auto", "inverse", x.device, x.dtype)
    assert chosen.name == "torch"
    messages = [str(r.message) for r in record]
    assert len(messages) == 1
    assert "undefined symbol" in messages[0] and "--no-build-isolation" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ck.cinc_conv2d_inverse(x, w)
    torch.testing.assert_close(y.double(), ck.reference.inverse(x.double(), w.double()), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="undefined symbol"):
        backends.select("cpu", "inverse", x.device, x.dtype)


def test_the_extension_can_be_left_unloaded():
    code = ("import warnings, torch, cinc_kernels as ck\n"
            "assert 'cpu' not in ck.available_backends(), ck.available_backends()\n"
            "print(ck.backends.select('auto', 'inverse', torch.device('cpu'), torch.float32).name)\n")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, _extension.SKIP_ENV: "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


# --------------------------------------------------------------------------------------------------------------
# optional dependencies


def test_import_needs_only_torch():
    code = ("import sys\n"
            "for name in ('numpy', 'tqdm', 'matplotlib', 'sklearn', 'torchvision', 'triton'):\n"
            "    sys.modules.setdefault(name, None)\n"
            "import cinc_kernels, cinc_kernels.nn, cinc_kernels.flow\n"
            "print(cinc_kernels.available_backends())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("module,extra", [("tqdm", "bench"), ("matplotlib.pyplot", "bench"),
                                          ("sklearn.datasets", "flow"), ("torchvision", "flow")])
def test_a_missing_optional_library_names_its_extra(module, extra, monkeypatch):
    from cinc_kernels._optional import optional_import

    monkeypatch.setitem(sys.modules, module.split(".")[0], None)
    if module != module.split(".")[0]:
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError) as err:
        optional_import(module, extra, "a feature")
    message = str(err.value)
    assert f"cinc_kernels[{extra}]" in message and module.split(".")[0] in message and "a feature" in message


@pytest.mark.parametrize("blocked,call", [
    ("sklearn", lambda: __import__("cinc_kernels.flow.data", fromlist=["load_data"]).load_data("digits")),
    ("matplotlib", lambda: __import__("cinc_kernels.flow.train", fromlist=["_plot_history"])._plot_history(
        {"train_step": [1], "train_bpd": [1.0]}, "unused.png", "")),
])
def test_a_feature_without_its_library_names_the_extra(blocked, call, monkeypatch):
    for name in list(sys.modules):
        if name == blocked or name.startswith(blocked + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.raises(ImportError, match=r"cinc_kernels\[flow\]"):
        call()


# --------------------------------------------------------------------------------------------------------------
# installs into fresh virtual environments (each a full C++ build: `make test-install`)

install = pytest.mark.skipif(os.environ.get("CINC_TEST_INSTALL") != "1",
                             reason="a full C++ build each; run by `make test-install` (part of `make test`), "
                                    "or set CINC_TEST_INSTALL=1")


def _venv(path) -> str:
    """A fresh virtual environment that sees the installed torch (not the checkout); returns its python.

    Without its own pip: ensurepip would also put its bundled setuptools (65.5 on Python 3.11, too old for the
    project's metadata) in front of the installed one.
    """
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], check=True)
    return os.path.join(str(path), "bin", "python")


def _pip(python: str, *args: str) -> None:
    out = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                          *args], capture_output=True, text=True, env={**os.environ, "CINC_CUDA": "0"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _check_outside_repository(python: str, venv, cwd) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import cinc_kernels; print(cinc_kernels.__file__)"], cwd=cwd,
                           capture_output=True, text=True, env=env)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv)), f"imported {where.stdout.strip()}, not the installed copy"
    check = subprocess.run([python, "-m", "cinc_kernels", "check"], cwd=cwd, capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "all backends agree" in check.stdout and " cpu " in check.stdout and " torch " in check.stdout


@install
def test_wheel_is_abi3_and_installs_into_a_fresh_venv(tmp_path, sdist):
    wheels = tmp_path / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps",
                          "--no-build-isolation", "-w", str(wheels), sdist], capture_output=True, text=True,
                         env={**os.environ, "CINC_CUDA": "0"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = glob.glob(str(wheels / "*.whl"))
    assert os.path.basename(wheel).startswith("cinc_kernels-0.1.0-cp310-abi3-"), wheel
    venv = tmp_path / "venv"
    python = _venv(venv)
    _pip(python, wheel)
    _check_outside_repository(python, venv, tmp_path)

    # The installed build record names this torch; another one makes the import fail with both versions.
    (info_path,) = glob.glob(str(venv / "lib" / "python*" / "site-packages" / "cinc_kernels" / "_build_info.json"))
    with open(info_path) as f:
        text = f.read()
    assert f'"torch": "{torch.__version__}"' in text
    with open(info_path, "w") as f:
        f.write(text.replace(f'"torch": "{torch.__version__}"', '"torch": "2.11.0+cu126"'))
    out = subprocess.run([python, "-c", "import cinc_kernels"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0
    assert "2.11.0+cu126" in out.stderr and torch.__version__ in out.stderr and "--no-build-isolation" in out.stderr


@install
def test_sdist_installs_into_a_fresh_venv(tmp_path, sdist):
    venv = tmp_path / "venv"
    python = _venv(venv)
    _pip(python, sdist)
    _check_outside_repository(python, venv, tmp_path)
