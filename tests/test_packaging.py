"""How the package installs: the sdist's contents, the import-time torch check, the GPU arch check, the warned
fallbacks, the optional dependencies, the parts every package carries (licence, citation, changelog, one version,
console scripts), and (with ``CINC_TEST_INSTALL=1``, as ``make test-install`` runs it) a wheel and an sdist installed
into fresh virtual environments and checked from outside the repository, and that check run through the Makefile
from inside a virtual environment.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import tarfile
import types
import warnings

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import _extension, _version, backends

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
    for required in ("setup.py", "pyproject.toml", "MANIFEST.in", "cinc_kernels/py.typed", "LICENSE", "CITATION.cff",
                     "CHANGELOG.md", "requirements.txt", "requirements-test.txt"):
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


NINJA_LINES = ("[1/2] c++ -MMD -MF x.o.d -O3 -c -c /src/csrc/cinc_ops.cpp -o /b/cinc_ops.o -O3 -std=c++20\n"
               "[2/2] /usr/local/cuda/bin/nvcc -c /src/csrc/cuda/cinc_cuda.cu -o /b/cinc_cuda.o\n")


def test_the_quiet_build_shows_progress_and_logs_the_commands(setup_namespace, tmp_path, capfd):
    log = tmp_path / "build" / "build.log"
    with setup_namespace["quiet_output"](str(log)):
        # As ninja does: a child process writing to the inherited file descriptors.
        subprocess.run(["sh", "-c", f"printf '{NINJA_LINES}'; echo 'a compiler warning' >&2"], check=True)
    shown = capfd.readouterr()
    assert shown.out.splitlines() == [f"  [1/2] compiling {os.path.relpath('/src/csrc/cinc_ops.cpp', ROOT)}",
                                      f"  [2/2] compiling {os.path.relpath('/src/csrc/cuda/cinc_cuda.cu', ROOT)}"]
    assert shown.err == ""
    text = log.read_text()
    assert NINJA_LINES in text and "a compiler warning" in text


def test_a_failed_quiet_build_shows_the_end_of_its_log(setup_namespace, tmp_path, capfd):
    log = tmp_path / "build.log"
    with pytest.raises(subprocess.CalledProcessError), setup_namespace["quiet_output"](str(log)):
        subprocess.run(["sh", "-c", "echo 'x.cpp:3:1: error: expected ;' >&2; exit 1"], check=True)
    shown = capfd.readouterr().out
    assert "x.cpp:3:1: error: expected ;" in shown and str(log) in shown
    assert "x.cpp:3:1: error: expected ;" in log.read_text()


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
    monkeypatch.setenv("CINC_TRUST_KERNELS", "1")  # the pretend GPU cannot run the first-use self-check
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
    ("matplotlib", lambda: __import__("cinc_kernels.flow.plots", fromlist=["plot_history"]).plot_history(
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
# what every package carries: licence, citation, changelog, one version, console scripts


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_the_version_lives_in_one_place():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cinc_kernels._version.__version__"}
    assert ck.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", ck.__version__), ck.__version__
    literal = re.compile(r"[\"']" + re.escape(ck.__version__) + r"[\"']")
    sources = ["setup.py", "pyproject.toml"] + [
        os.path.relpath(os.path.join(folder, name), ROOT)
        for folder, _, names in os.walk(os.path.join(ROOT, "cinc_kernels")) for name in names if name.endswith(".py")]
    others = [path for path in sources if path != os.path.join("cinc_kernels", "_version.py")
              and literal.search(_read(path))]
    assert not others, f"the version is written out again in {others}"


def test_license_is_the_mit_licence_pyproject_declares():
    project = _pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = _read("LICENSE")
    assert text.startswith("MIT License\n")
    assert re.search(r"^Copyright \(c\) \d{4} The cinc_kernels authors$", text, re.MULTILINE)
    assert "WITHOUT WARRANTY OF ANY KIND" in text


def test_citation_names_the_paper_and_this_version():
    yaml = pytest.importorskip("yaml", reason="reading CITATION.cff needs PyYAML (requirements-test.txt has it)")
    cff = yaml.safe_load(_read("CITATION.cff"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == ck.__version__ and cff["license"] == _pyproject()["project"]["license"]
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("CInC Flow: Characterizable Invertible 3×3 Convolution")
    assert [a["family-names"] for a in paper["authors"]] == ["Nagar", "Dufraisse", "Varma"]
    assert paper["year"] == 2021 and "UAI" in paper["conference"]["name"]


def test_changelog_keeps_a_changelog_with_this_version():
    text = _read("CHANGELOG.md")
    versions = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?", text, re.MULTILINE)
    assert versions and versions[0][0] == "Unreleased", versions
    assert ck.__version__ in [v for v, _ in versions], f"CHANGELOG.md has no section for {ck.__version__}"
    dates = [d for v, d in versions[1:]]
    assert all(dates) and dates == sorted(dates, reverse=True), "released sections need dates, newest first"
    sections = set(re.findall(r"^### (\w+)", text, re.MULTILINE))
    assert sections and sections <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, sections


def _entry_point(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _call(func, argv: list[str]) -> int:
    try:
        code = func(argv)
    except SystemExit as exc:  # argparse's --help and --version
        code = exc.code
    return 0 if code is None else code


@pytest.mark.parametrize("script,commands", [("cinc-kernels", ["info", "check", "bench"]),
                                             ("cinc-flow", ["train", "sample", "eval", "edit"])])
def test_console_scripts_answer_version_and_help(script, commands, monkeypatch, capsys):
    func = _entry_point(_pyproject()["project"]["scripts"][script])
    monkeypatch.setattr(sys, "argv", [os.path.join("venv", "bin", script)])
    assert _call(func, ["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cinc_kernels {ck.__version__}"
    assert _call(func, ["--help"]) == 0
    usage = capsys.readouterr().out
    assert usage.startswith(f"usage: {script} ")
    assert all(command in usage for command in commands), usage


@pytest.mark.parametrize("module,script", [("cinc_kernels", "cinc-kernels"), ("cinc_kernels.flow", "cinc-flow")])
def test_the_module_forms_name_themselves_in_usage(module, script, capsys, monkeypatch):
    func = _entry_point(_pyproject()["project"]["scripts"][script])
    monkeypatch.setattr(sys, "argv", [os.path.join(module.replace(".", os.sep), "__main__.py")])
    assert _call(func, ["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


# --------------------------------------------------------------------------------------------------------------
# installs into fresh virtual environments (each a full C++ build: `make test-install`)

install = pytest.mark.skipif(os.environ.get("CINC_TEST_INSTALL") != "1",
                             reason="a full C++ build each; run by `make test-install` (part of `make check`), "
                                    "or set CINC_TEST_INSTALL=1")


def _site_dirs() -> list[str]:
    """The folders this interpreter imports installed packages from, in its order: its environment's site-packages,
    those it sees through ``--system-site-packages`` or a ``.pth`` file, the user's. Never the checkout."""
    return [p for p in sys.path
            if os.path.basename(os.path.normpath(p)) in ("site-packages", "dist-packages") and os.path.isdir(p)]


def _without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _venv(path) -> str:
    """A fresh virtual environment that sees the packages of the Python running this (torch), not the checkout;
    returns its python.

    ``--system-site-packages`` would not do: inside a virtual environment (a user's first step) it shows the *base*
    interpreter's packages, not that environment's, so the user's torch would be missing. A ``.pth`` file naming this
    interpreter's site folders works wherever it stands (system Python, venv, conda). Plain folder lines, so the
    ``.pth`` files inside them (an editable install of this checkout) stay out. Without its own pip: ensurepip would
    also put its bundled setuptools (65.5 on Python 3.11, too old for the project's metadata) in front of the
    installed one.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = os.path.join(str(path), "Scripts" if os.name == "nt" else "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "_outer_site_packages.pth"), "w") as f:
        f.write("".join(folder + "\n" for folder in _site_dirs()))
    found = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                           env=_without_pythonpath())
    if found.returncode != 0 or found.stdout.strip() != torch.__version__:
        pytest.skip(f"a fresh virtual environment cannot see this Python's torch {torch.__version__} (at "
                    f"{os.path.dirname(torch.__file__)}, outside its site folders {_site_dirs()})")
    return python


def _pip(python: str, *args: str) -> None:
    out = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                          *args], capture_output=True, text=True, env={**os.environ, "CINC_CUDA": "0"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _check_outside_repository(python: str, venv, cwd) -> None:
    env = _without_pythonpath()
    where = subprocess.run([python, "-c", "import cinc_kernels; print(cinc_kernels.__file__)"], cwd=cwd,
                           capture_output=True, text=True, env=env)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv)), f"imported {where.stdout.strip()}, not the installed copy"
    check = subprocess.run([python, "-m", "cinc_kernels", "check"], cwd=cwd, capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "all backends agree" in check.stdout and " cpu " in check.stdout and " torch " in check.stdout
    for script in ("cinc-kernels", "cinc-flow"):
        version = subprocess.run([os.path.join(os.path.dirname(python), script), "--version"], cwd=cwd,
                                 capture_output=True, text=True, env=env)
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip() == f"cinc_kernels {ck.__version__}"


WHEEL_ENV = "CINC_TEST_WHEEL"


@pytest.fixture(scope="module")
def wheel(request, tmp_path_factory) -> str:
    """The cp310-abi3 wheel built from the sdist, or the one ``CINC_TEST_WHEEL`` names (already built)."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        return given
    sdist_path = request.getfixturevalue("sdist")
    wheels = tmp_path_factory.mktemp("wheels")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps",
                          "--no-build-isolation", "-w", str(wheels), sdist_path], capture_output=True, text=True,
                         env={**os.environ, "CINC_CUDA": "0"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = glob.glob(str(wheels / "*.whl"))
    return path


@install
def test_wheel_is_abi3_and_installs_into_a_fresh_venv(tmp_path, wheel):
    assert os.path.basename(wheel).startswith(f"cinc_kernels-{ck.__version__}-cp310-abi3-"), wheel
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


@install
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_install_passes_inside_a_users_venv(tmp_path, wheel):
    """What a new user does: make a venv, activate it, run make. The Makefile's install check then runs with that
    venv's python and makes its own environments from inside it (reusing the wheel instead of a second build)."""
    venv = tmp_path / "user-venv"
    python = _venv(venv)
    env = {**_without_pythonpath(), "VIRTUAL_ENV": str(venv), WHEEL_ENV: wheel,
           "PATH": os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("PYTHON", None)  # so the Makefile's `python3` is the activated venv's, first on PATH
    assert os.path.isfile(os.path.join(os.path.dirname(python), "python3"))
    done = subprocess.run(["make", "--no-print-directory", "-C", ROOT, "test-install", "INSTALL_TESTS=wheel_is_abi3"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\b1 passed\b", done.stdout), done.stdout[-3000:]


def test_a_venv_made_inside_a_venv_sees_that_venvs_packages(tmp_path):
    """The install tests' environments see what the Python running them sees, also when that Python is itself a
    virtual environment holding packages its base interpreter lacks (as a user's torch)."""
    outer = _venv(tmp_path / "outer")
    only_outer = tmp_path / "outer-only" / "site-packages"
    (only_outer / "only_in_the_outer_venv").mkdir(parents=True)
    (only_outer / "only_in_the_outer_venv" / "__init__.py").write_text("")
    purelib = subprocess.run([outer, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "only_outer.pth"), "w") as f:
        f.write(f"{only_outer}\n")
    make_inner = (f"import sys; sys.path.insert(0, {ROOT!r}); from tests.test_packaging import _venv; "
                  f"print(_venv({str(tmp_path / 'inner')!r}))")
    made = subprocess.run([outer, "-c", make_inner], cwd=tmp_path, capture_output=True, text=True,
                          env=_without_pythonpath())
    assert made.returncode == 0, made.stderr[-3000:]
    inner = made.stdout.strip().splitlines()[-1]
    assert inner.startswith(str(tmp_path / "inner"))
    probe = subprocess.run([inner, "-c", "import only_in_the_outer_venv, torch; print(torch.__version__)"],
                           cwd=tmp_path, capture_output=True, text=True, env=_without_pythonpath())
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip() == torch.__version__
    where = subprocess.run([inner, "-c", "import cinc_kernels; print(cinc_kernels.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=_without_pythonpath())
    assert where.returncode != 0 or not where.stdout.strip().startswith(ROOT + os.sep), "it imports the checkout"


def _make_dry_run(*args: str, env_extra: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("CINC_CUDA", "MAKEFLAGS", "MAKELEVEL")}
    env.update(env_extra or {})
    done = subprocess.run(["make", "-n", "build", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_builds_the_cuda_kernels_only_where_a_gpu_is_visible():
    """Without CINC_CUDA, make's build has the CUDA kernels only where a GPU is visible; CINC_CUDA, from the command
    line or the environment, decides otherwise."""
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False) \
        if shutil.which("nvidia-smi") else None
    visible = bool(listed and listed.returncode == 0 and listed.stdout.strip()) or bool(glob.glob("/dev/nvidia[0-9]*"))
    assert f"(CINC_CUDA={'auto' if visible else '0'})" in _make_dry_run()
    assert "(CINC_CUDA=1)" in _make_dry_run("CINC_CUDA=1")
    assert "(CINC_CUDA=auto)" in _make_dry_run(env_extra={"CINC_CUDA": "auto"})

