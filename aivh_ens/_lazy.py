"""Lazy re-exports for package ``__init__`` modules (the pattern of optuna's and SciPy's ``__init__``).

``import aivh_ens`` and ``import aivh_ens.blend.core`` stay cheap: a public name's module (and torch,
optuna or matplotlib behind it) is imported the first time the name is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def attach(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, whose public names live in submodules.

    Args:
        package: the package's ``__name__``.
        exports: ``{public name: module}``, the module absolute or relative to ``package`` (``".core"``).
    """
    table = dict(exports)

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        globals_of(package)[name] = value  # cache: the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals_of(package)) | set(table))

    return __getattr__, __dir__, sorted(table)


def globals_of(package: str) -> dict[str, Any]:
    import sys

    return vars(sys.modules[package])
