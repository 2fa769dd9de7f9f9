"""The ``histoduo`` command line: option parsing only; the work lives in library modules.

Each command family is a module here that registers its commands on ``app``; heavy libraries
(torch, timm, openslide) are imported inside the commands so ``histoduo --help`` stays instant.
"""

from __future__ import annotations

# Importing the command modules registers their commands on ``app``.
from histoduo.cli import (
    demo,  # noqa: F401
    encoders,  # noqa: F401
    importer,  # noqa: F401
    mil,  # noqa: F401
    models,  # noqa: F401
    predict,  # noqa: F401
    qc,  # noqa: F401
    slides,  # noqa: F401
    tissue,  # noqa: F401
    train,  # noqa: F401
)
from histoduo.cli._app import app

__all__ = ["app"]
