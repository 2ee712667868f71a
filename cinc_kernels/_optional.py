"""Libraries that only some features need: ``import cinc_kernels`` needs torch alone, and a feature whose library is
missing says which extra installs it (``pip install "cinc_kernels[flow]"``)."""
from __future__ import annotations

import importlib
import types


def optional_import(module: str, extra: str, feature: str) -> types.ModuleType:
    """Import ``module``; if it is not installed, raise ``ImportError`` naming it, ``feature`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(
            f"{feature} needs {top}, which is not installed: pip install \"cinc_kernels[{extra}]\" "
            f"(or pip install {_DISTRIBUTIONS.get(top, top)})"
        ) from exc


# Import names whose distribution is called otherwise.
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow"}
