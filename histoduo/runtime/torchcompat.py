"""Torch-side environment fixes, applied once, before torchvision or timm import.

The torchvision 0.28.0 wheel our machines get is a CUDA build; next to a CPU-only torch its
compiled ops library cannot load, and ``import torchvision`` then fails with
"operator torchvision::nms does not exist" because its Python layer registers fake kernels for
ops whose schemas were never defined. Defining the two missing schemas first lets torchvision
(and timm, which imports it) load. Where torchvision's own ``_C`` loads, nothing is changed.
"""

from __future__ import annotations

import importlib.util

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the registration alive for the life of the process


def _native_ops_load() -> bool:
    """True when torchvision's compiled ops library loads next to this torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix
    import glob
    import os

    for location in spec.submodule_search_locations:
        for lib in glob.glob(os.path.join(location, "_C*.so")) + glob.glob(
            os.path.join(location, "_C*.pyd")
        ):
            try:
                torch.ops.load_library(lib)
                return True
            except (OSError, RuntimeError):
                return False
    return False


def ensure_torchvision() -> None:
    """Make ``import torchvision`` (and so ``import timm``) work on CPU-only torch."""
    global _library
    if _library is not None:
        return
    import torch

    if _native_ops_load():
        _library = False  # marks "checked"; nothing registered
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        try:
            lib.define(schema)
        except RuntimeError:
            pass  # already defined by someone else
        del name
    _library = lib


def import_timm():
    """Import timm after the torchvision fix; the one entry point the package uses."""
    ensure_torchvision()
    import timm

    return timm
