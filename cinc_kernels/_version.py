"""The package version, in this one place: ``pyproject.toml`` reads it for the metadata (``[tool.setuptools.dynamic]``),
``cinc_kernels.__version__`` and ``--version`` print it; ``CITATION.cff`` and ``CHANGELOG.md`` name it
(tests/test_packaging.py checks they agree)."""

__version__ = "0.1.0"
