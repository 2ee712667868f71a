"""The README's promises that a registry can check: the backend table's dtypes are the ones each backend declares
(``cinc_kernels/backends.py``), so the table cannot claim a dtype that a backend refuses."""
from __future__ import annotations

import pathlib
import re

import pytest

from cinc_kernels.backends import OPS, all_backends, get_backend

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
# Every backend a user can name, from the registry (the README's table must have a row for each).
PUBLIC_BACKENDS = [b.name for b in all_backends() if b.public]


def _backend_rows() -> dict[str, str]:
    """``{backend: its dtypes cell}`` from the table whose header is ``| backend | what | devices | dtypes |``."""
    rows = {}
    for line in README.read_text().splitlines():
        match = re.match(r"\|\s*`(\w+)`\s*\|.*\|.*\|(.*)\|\s*$", line)
        if match and match.group(1) in PUBLIC_BACKENDS:
            rows[match.group(1)] = match.group(2)
    return rows


@pytest.mark.parametrize("name", PUBLIC_BACKENDS)
def test_backend_table_dtypes_are_the_declared_ones(name):
    cell = _backend_rows()[name]
    claimed = {d for d in DTYPE_NAMES if re.search(rf"\b{d}\b", cell)}
    backend = get_backend(name)
    declared = {str(d).removeprefix("torch.") for op in OPS for device in DEVICE_TYPES
                if backend.runs_on(device) for d in backend.dtypes(op, device)}
    assert "any" not in cell, f"README: {name} takes {cell.strip()!r}"
    assert claimed == declared, f"README says {name} takes {sorted(claimed)}; it declares {sorted(declared)}"
