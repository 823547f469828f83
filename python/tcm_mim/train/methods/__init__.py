"""Pretraining methods as objects, registered by name (``method: spark | tcm | anatomask | amlp``).

Adding a method is one new module in this package: a :class:`Method` subclass decorated with
:func:`register`. Every module here is imported with the package, so it registers itself.
"""

import importlib
import pkgutil

from .base import Method, method_class, method_names, register

# The built-in methods first, in the order the docs and --help list them; then any other module.
_FIRST = ("spark", "tcm", "anatomask", "amlp")
for _name in (*_FIRST, *sorted({i.name for i in pkgutil.iter_modules(__path__)} - {"base", *_FIRST})):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["Method", "method_class", "method_names", "register"]
