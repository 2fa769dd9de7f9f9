"""Package exports that import their module on first use.

A package's ``__init__`` that imported every submodule would pull torch into anything that
touches the package, ``histoduo --help`` and the CLI's option defaults included. With
:func:`lazy_exports` the names stay importable from the package (``from histoduo.models
import build_model``) while ``histoduo.models.config`` alone stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``; ``exports`` maps name -> submodule."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
