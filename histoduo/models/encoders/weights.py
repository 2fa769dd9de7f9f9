"""Local encoder weights: find the file, hash it, read tensors only, fit them to the trunk.

Weights are the user's own download (licences forbid redistribution): never fetched, never
copied into outputs; outputs record the file's sha256 instead. Torch files go through torch's
tensors-only loader (``weights_only=True``), never the full unpickler.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from histoduo.models.encoders.registry import EncoderError

if TYPE_CHECKING:
    import torch
    from torch import nn

# The names a downloaded model folder (a Hugging Face snapshot) keeps its weights under.
FOLDER_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Wrappers training code puts in front of the trunk's own key names.
KNOWN_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "trunk.", "teacher.", "student.")
# Keys a trunk built for embedding never has and never needs: classifier heads (num_classes
# is 0) and DINOv2's masked-modelling token. Ignored; any other extra key is an error.
_IGNORED_KEYS = ("head.weight", "head.bias", "fc.weight", "fc.bias", "mask_token")
_HASH_CHUNK_BYTES = 8 * 2**20


def resolve_weights_file(path: str | Path) -> Path:
    """The weights file itself, or the one inside a downloaded model folder."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise EncoderError(
                path, f"not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})"
            )
        return path
    if path.is_dir():
        for name in FOLDER_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        candidates = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if len(candidates) == 1:
            return candidates[0]
        found = ", ".join(p.name for p in candidates) or "no weights files"
        raise EncoderError(
            path,
            f"model folder without {' or '.join(FOLDER_WEIGHT_NAMES)} ({found}); pass the "
            "weights file itself",
        )
    raise EncoderError(path, "weights file or folder not found (weights are never downloaded)")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (a 2.5 GB ViT never sits in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """name -> tensor of a .safetensors or torch file (tensors-only loader, unwrapped)."""
    from histoduo.models.weights import WeightsError, read_state_dict

    try:
        return read_state_dict(path, trust=False)
    except WeightsError as err:  # its message already says what is wrong with the file
        raise EncoderError(path, f"cannot use these weights ({err})") from err


@dataclass
class FitReport:
    """How a file's tensors map onto the trunk."""

    path: str
    prefix: str
    state: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"loaded {len(self.state)} tensors from {self.path}"
        if self.prefix:
            text += f" (prefix {self.prefix!r} stripped)"
        if self.ignored:
            text += f"; ignored {', '.join(self.ignored)}"
        return text


def _strip_prefix(keys: list[str], target: set[str]) -> str:
    """The wrapper prefix(es) whose removal matches the most trunk keys ('' = none)."""
    best, best_hits = "", sum(k in target for k in keys)
    candidates = set()
    for key in keys:
        # Nested wrappers too ("module.backbone."): every leading run of known prefixes.
        prefix = ""
        rest = key
        while True:
            hit = next((p for p in KNOWN_PREFIXES if rest.startswith(p)), None)
            if hit is None:
                break
            prefix += hit
            rest = rest[len(hit) :]
            candidates.add(prefix)
    for prefix in sorted(candidates, key=len):
        hits = sum(k.startswith(prefix) and k[len(prefix) :] in target for k in keys)
        if hits > best_hits:
            best, best_hits = prefix, hits
    return best


def fit_state_dict(trunk: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> FitReport:
    """Rename ``tensors`` to the trunk's keys; an error that says what the file holds when
    it is for another architecture (missing / unexpected counts and example shapes)."""
    target = trunk.state_dict()
    prefix = _strip_prefix(list(tensors), set(target))
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    for key, tensor in tensors.items():
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if name in target:
            state[name] = tensor
        elif name in _IGNORED_KEYS:
            ignored.append(key)
        else:
            unexpected.append(key)
    missing = [k for k in target if k not in state]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    if missing or shapes or unexpected:
        detail = [f"{len(state)} of {len(target)} model tensors found by name"]
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            detail.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:3])})")
        raise EncoderError(
            path,
            "weights do not fit this encoder's architecture (a file for another model?): "
            + "; ".join(detail),
        )
    # The file's dtype (often fp16/bf16) must not change the trunk's: cast to the model's.
    state = {k: v.to(dtype=target[k].dtype) for k, v in state.items()}
    return FitReport(str(path), prefix, state, ignored)
