"""The documentation: docstring examples run and give what they show, the API reference (docs/api*.md, built by
``make docs``) covers every public function and layer, and the site's navigation holds every page of docs/."""
from __future__ import annotations

import doctest
import importlib
import inspect
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "cinc_kernels")
DOCS = os.path.join(ROOT, "docs")

# The modules whose public names (``__all__``) the API reference must show.
PUBLIC_MODULES = ["cinc_kernels", "cinc_kernels.functional", "cinc_kernels.nn", "cinc_kernels.conditioning",
                  "cinc_kernels.backends", "cinc_kernels.masks", "cinc_kernels.reference", "cinc_kernels.flow",
                  "cinc_kernels.harness"]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _modules_with_examples() -> list[str]:
    found = []
    for folder, _, names in os.walk(PACKAGE):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if name.endswith(".py") and ">>> " in _read(path):
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(found)


def test_the_main_entry_points_carry_examples():
    assert {"cinc_kernels.functional", "cinc_kernels.nn"} <= set(_modules_with_examples())


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples_run(module):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    for test in doctest.DocTestFinder().find(importlib.import_module(module), module):
        runner.run(test, out=report.write)
    assert runner.tries > 0, f"{module} has '>>> ' but no example doctest can find"
    assert runner.failures == 0, report.getvalue()


def _directives() -> dict[str, list[str] | None]:
    """``::: path`` of each API page -> its ``members:`` list (``None``: all of the module's public members)."""
    found: dict[str, list[str] | None] = {}
    for name in sorted(os.listdir(DOCS)):
        if not (name.startswith("api") and name.endswith(".md")):
            continue
        text = _read(os.path.join(DOCS, name))
        for block in re.split(r"^(?=::: )", text, flags=re.MULTILINE)[1:]:
            path = block.split()[1]
            members = re.search(r"^\s+members:\n((?:\s+- \S+\n)+)", block, re.MULTILINE)
            found[path] = re.findall(r"- (\S+)", members.group(1)) if members else None
    return found


def _resolve(path: str):
    module, _, attr = path.rpartition(".")
    try:
        return importlib.import_module(path)
    except ImportError:
        return getattr(importlib.import_module(module), attr)


def _shown_objects() -> list[object]:
    shown = []
    for path, members in _directives().items():
        obj = _resolve(path)
        if inspect.ismodule(obj):
            names = members if members is not None else getattr(obj, "__all__", [])
            shown += [getattr(obj, name) for name in names]
        else:
            shown.append(obj)
    return shown


def _public(module: str) -> list[tuple[str, object]]:
    mod = importlib.import_module(module)
    return [(f"{module}.{name}", getattr(mod, name)) for name in mod.__all__]


def test_the_api_reference_shows_every_public_function_and_class():
    shown = _shown_objects()
    missing = [name for module in PUBLIC_MODULES for name, obj in _public(module)
               if (inspect.isfunction(obj) or inspect.isclass(obj)) and not any(obj is s for s in shown)]
    assert not missing, f"docs/api*.md do not show {missing}"


def test_every_public_function_and_class_has_a_docstring():
    # The reference leaves undocumented objects out, so a missing docstring is a missing entry.
    bare = [name for module in PUBLIC_MODULES for name, obj in _public(module)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip()]
    assert not bare, f"no docstring: {bare}"


def test_the_site_navigation_holds_every_page():
    yaml = pytest.importorskip("yaml", reason="reading mkdocs.yml needs PyYAML (requirements-test.txt has it)")
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)

    def pages(nav):
        for entry in nav:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    listed = sorted(pages(config["nav"]))
    on_disk = sorted(name for name in os.listdir(DOCS) if name.endswith(".md"))
    assert listed == on_disk
    assert config["strict"] is True
