"""Optional-dependency imports that fail with a message naming the package and the extra."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, *, package: str | None = None, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming the pip package and what needed it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pkg = package or module
        raise ImportError(
            f"{purpose} needs the package '{pkg}' (module '{module}'), which is not installed: "
            f"pip install '{pkg}' or install the training extra: pip install -e '.[train]'"
        ) from err
