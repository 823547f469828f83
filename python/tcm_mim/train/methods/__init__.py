"""Pretraining methods as objects, registered by name (``method: spark | tcm | anatomask | amlp``).

Adding a method is one new module in this package: a :class:`Method` subclass decorated with
:func:`register`. Every module here is imported on first use, so it registers itself.
"""

import importlib
import pkgutil

from .base import Method, method_class, method_names, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "method_class", "method_names", "register"]
