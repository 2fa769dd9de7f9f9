"""histoduo: whole-slide histopathology from scanned slides to graded reports."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histoduo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
