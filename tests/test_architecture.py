"""The package's shape, checked: the reference is a leaf that no fast path imports and whose mask agrees with the
production one, Triton loads only when asked for, one kernel-size limit, one set of op schemas in every namespace,
and each backend's declared dtypes are what its kernels take."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import _extension, functional, masks, reference
from cinc_kernels.backends import HALVES, all_backends, get_backend
from cinc_kernels.contract import OP_NAMES, SIGNATURES

PACKAGE = os.path.dirname(os.path.abspath(ck.__file__))
ROOT = os.path.dirname(PACKAGE)

# The only modules that may import the reference: the package front (re-exports it as ck.reference), the registry
# (offers it as backend="reference") and the self-check (compares every backend with it).
MAY_IMPORT_REFERENCE = {"cinc_kernels", "cinc_kernels.backends", "cinc_kernels.selfcheck"}


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                yield ".".join(parts), path


def _imported(module: str, path: str) -> set:
    """Absolute names of the modules and attributes ``path`` imports (relative imports resolved)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            names.add(stem)
            names.update(f"{stem}.{a.name}" for a in node.names)
    return names


def test_no_production_module_imports_the_reference():
    modules = dict(_modules())
    assert "cinc_kernels.registration" in modules and "cinc_kernels.triton.ops" in modules
    offenders = {m for m, path in modules.items()
                 if m not in MAY_IMPORT_REFERENCE and "cinc_kernels.reference" in _imported(m, path)}
    assert not offenders, f"these modules import cinc_kernels.reference: {sorted(offenders)}"


def test_the_reference_imports_nothing_of_the_package():
    path = os.path.join(PACKAGE, "reference.py")
    inner = {n for n in _imported("cinc_kernels.reference", path) if n.startswith("cinc_kernels")}
    assert not inner, inner


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("C,k", [(1, 1), (2, 3), (5, 2), (7, 7), (13, 3)])
def test_reference_and_production_masks_agree(C, k, unit):
    assert torch.equal(reference.weight_mask(C, k, unit), masks.weight_mask(C, k, unit))
    assert int(masks.weight_mask(C, k, unit).sum()) == masks.free_parameters(C, k, unit)
    g = torch.Generator().manual_seed(C * 100 + k)
    w = torch.randn(C, C, k, k, generator=g, dtype=torch.float64)
    assert torch.equal(reference.masked_weight(w, unit), masks.masked_weight(w, unit))
    assert torch.equal(reference.centre_tap(w, unit), masks.centre_tap(w, unit))


def test_import_does_not_import_triton():
    code = ("import sys, torch, cinc_kernels as ck\n"
            "x = torch.randn(1, 2, 3, 3); w = torch.eye(2)[:, :, None, None].repeat(1, 1, 3, 3)\n"
            "ck.cinc_conv2d_inverse(ck.cinc_conv2d(x, w), w); ck.CInCConv2d(2)(x)\n"
            "assert 'triton' not in sys.modules, 'import cinc_kernels imported triton'\n"
            "names = ck.available_backends()\n"
            "from cinc_kernels.backends import all_backends\n"
            "assert 'triton' in [b.name for b in all_backends()], 'the triton backend did not register when listed'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_one_kernel_size_limit_in_python_and_cpp():
    """``functional.MAX_KERNEL_SIZE`` is the bound csrc/cinc_checks.h enforces on direct op calls."""
    k_max = functional.MAX_KERNEL_SIZE
    x = torch.randn(1, 2, 3, 3)
    for k in (k_max, k_max + 1):
        w = torch.eye(2)[:, :, None, None].repeat(1, 1, k, k)
        if k <= k_max:
            assert torch.ops.cinc.forward(x, w, None, False).shape == x.shape
            assert ck.cinc_conv2d(x, w, backend="cpu").shape == x.shape
        else:
            with pytest.raises(RuntimeError, match=f"kernel size k must be in 1…{k_max}, got {k}"):
                torch.ops.cinc.forward(x, w, None, False)
            with pytest.raises(ValueError, match=f"kernel size k must be in 1…{k_max}, got {k}"):
                ck.cinc_conv2d(x, w, backend="cpu")


def _signature(overload: torch._ops.OpOverload) -> str:
    """``"(Tensor x, ...) -> Tensor"`` of ``ns::op(Tensor x, ...) -> Tensor``."""
    schema = str(overload._schema)
    return schema[schema.index("("):]


def test_every_namespace_declares_the_schemas_of_cinc():
    """``csrc/cinc_ops.cpp`` defines the ``cinc::`` schemas, ``cinc_kernels.contract`` repeats them for the namespaces
    defined in Python: the two agree, and every backend whose ops are custom ops declares exactly them."""
    if _extension.ERROR is None:
        for op in OP_NAMES:
            assert _signature(getattr(torch.ops.cinc, op).default) == SIGNATURES[op], op
    namespaces = set()
    for backend in all_backends():
        for op, impl in backend.ops.items():
            if isinstance(impl, torch._ops.OpOverload):
                assert (op, _signature(impl)) == (op, SIGNATURES[op]), (backend.name, str(impl._schema))
                namespaces.add(impl.namespace)
    assert "cinc_torch" in namespaces


@pytest.mark.parametrize("op", OP_NAMES)
def test_cpu_declared_dtypes_are_what_the_kernels_take(op):
    """The ``cpu`` backend's dtype declaration mirrors the AT_DISPATCH lists of csrc/cpu/: each declared dtype runs,
    each other floating dtype is refused by the C++ op itself."""
    backend = get_backend("cpu")
    for dtype in (torch.float32, torch.float64) + HALVES:
        w = torch.eye(2, dtype=dtype)[:, :, None, None].repeat(1, 1, 2, 2)
        x = torch.randn(1, 2, 3, 3).to(dtype)
        args = {"forward": (x, w, None, False), "inverse": (x, w, None, False), "inverse_transpose": (x, w, False),
                "logdet": (w, 3, 3, False)}[op]
        if dtype in backend.dtypes(op, "cpu"):
            assert backend.ops[op](*args).dtype == dtype
        else:
            with pytest.raises(RuntimeError):
                backend.ops[op](*args)
