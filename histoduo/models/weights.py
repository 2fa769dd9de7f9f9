"""Backbone weights: none, timm hub download, or a local file (timm or torchvision layout)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Keys of classifier heads that a trunk file may carry and a backbone never wants.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")
# Wrappers checkpoints put around the state dict (Lightning, DINO, MoCo, torchvision refs).
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "student", "model_state", "network")
_HUB_HOST = ("huggingface.co", 443)
_HUB_PROBE_TIMEOUT_S = 3.0
# Fewer matching tensors than this means the file is for another architecture.
_MIN_MATCH_FRACTION = 0.5


class WeightsError(ValueError):
    """A weights file or source that cannot be used for this backbone."""


@dataclass
class LoadReport:
    """What happened when a weights file was loaded into a backbone."""

    path: str
    prefix_stripped: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored_head: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.path}"
        if self.prefix_stripped:
            text += f" (prefix {self.prefix_stripped!r} stripped)"
        if self.ignored_head:
            text += f"; ignored {len(self.ignored_head)} head tensors"
        if self.missing:
            text += f"; missing {len(self.missing)}: {', '.join(self.missing[:5])}"
        if self.unexpected:
            text += f"; unexpected {len(self.unexpected)}: {', '.join(self.unexpected[:5])}"
        return text


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_reachable(backbone_name: str) -> None:
    """Fail in seconds, not after a ~47 s hang, when timm weights cannot be downloaded.

    Offline mode (HF_HUB_OFFLINE) is left to timm, which then only reads the local cache and
    fails fast by itself; otherwise a short TCP probe of the hub decides.
    """
    if _env_flag("HF_HUB_OFFLINE"):
        return
    try:
        with socket.create_connection(_HUB_HOST, timeout=_HUB_PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise WeightsError(
            f"cannot download timm weights for {backbone_name}: the model hub "
            f"({_HUB_HOST[0]}) is unreachable ({err}). Pass a local weights file instead "
            "(--backbone-weights PATH to a .safetensors/.pth file)."
        ) from err


def offline_hint(backbone_name: str, err: Exception) -> WeightsError:
    """The error to raise when timm's pretrained download/cache lookup failed."""
    return WeightsError(
        f"timm pretrained weights for {backbone_name} are not available "
        f"({type(err).__name__}: {str(err)[:160]}). No hub access here (HF_HUB_OFFLINE="
        f"{os.environ.get('HF_HUB_OFFLINE', '')!s}): pass a local weights file instead "
        "(--backbone-weights PATH to a .safetensors/.pth file)."
    )


def read_state_dict(path: str | Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch file, unwrapped from ``state_dict``/``model``.

    A torch file is a pickle. torch's tensors-only loader (``weights_only=True``) refuses any
    object it does not know instead of running it, so plain state dicts (torchvision's and
    timm's ``.pth`` files) load as they are; a file that needs the full unpickler, which can
    run code, is read only with ``trust`` (``--trust-checkpoint``).
    """
    from histoduo.models.pickles import sniff_format, untrusted_pickle_error, warn_trusted_pickle

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path}")
    kind = sniff_format(path)
    if kind == "safetensors" or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # SafetensorError: truncated or not a safetensors file
            raise WeightsError(f"cannot read {path} as a safetensors file: {err}") from err
    if kind == "unknown":
        raise WeightsError(f"{path} is neither a safetensors nor a torch weights file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_err:  # objects beyond tensors and plain containers, or corrupt
        if not trust:
            raise WeightsError(
                f"{untrusted_pickle_error(path, 'weights file')} (the tensors-only loader "
                f"said: {str(safe_err).splitlines()[0][:200]})"
            ) from None
        warn_trusted_pickle(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # corrupt file, not a torch file
            raise WeightsError(f"cannot read {path} as a torch weights file: {err}") from err
    # Unwrap nested containers until a flat name -> tensor mapping remains.
    while isinstance(data, Mapping) and not any(isinstance(v, torch.Tensor) for v in data.values()):
        inner = next((data[k] for k in _WRAPPER_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            raise WeightsError(
                f"{path} holds no tensors at its top level and none of the wrapper keys "
                f"{_WRAPPER_KEYS}; found keys {list(data)[:8]}"
            )
        data = inner
    if not isinstance(data, Mapping):
        raise WeightsError(f"{path} does not contain a state dict (found {type(data).__name__})")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _best_prefix(source_keys: list[str], target_keys: set[str]) -> str:
    """The leading ``a.b.`` prefix whose removal matches the most target keys ('' = none)."""
    counts: dict[str, int] = {}
    for key in source_keys:
        parts = key.split(".")
        for cut in range(len(parts)):
            if ".".join(parts[cut:]) in target_keys:
                prefix = ".".join(parts[:cut]) + ("." if cut else "")
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    if not counts:
        return ""
    # Most matches wins; ties go to the shortest prefix (e.g. '' before 'module.').
    return max(counts, key=lambda p: (counts[p], -len(p)))


def load_backbone_file(backbone: nn.Module, path: str | Path, *, trust: bool = False) -> LoadReport:
    """Load a local trunk file into a timm ``features_only`` backbone, reporting mismatches.

    Accepts timm and torchvision key layouts (identical for ResNets), ``module.``/
    ``backbone.``/``encoder.`` style prefixes (the prefix matching most keys is stripped) and
    ignores classifier heads (``fc.*`` ...). Raises :class:`WeightsError` naming the file when
    shapes disagree or too few tensors match (a file for another architecture).
    """
    source = read_state_dict(path, trust=trust)
    target = backbone.state_dict()
    prefix = _best_prefix(list(source), set(target))
    renamed: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    for key, tensor in source.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name in target:
            renamed[name] = tensor
        elif name.startswith(_HEAD_PREFIXES):
            ignored.append(key)
        else:
            unexpected.append(key)
    # BatchNorm counters are bookkeeping, not weights: never worth a warning.
    wanted = [k for k in target if not k.endswith("num_batches_tracked")]
    matched = sum(k in renamed for k in wanted)
    if matched < _MIN_MATCH_FRACTION * len(wanted):
        raise WeightsError(
            f"{path} does not look like weights for this backbone: only {matched} of "
            f"{len(wanted)} tensors match by name (first file keys: {list(source)[:4]}; "
            f"first model keys: {wanted[:4]})"
        )
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in renamed.items()
        if v.shape != target[k].shape
    ]
    if mismatched:
        raise WeightsError(
            f"{path} does not fit this backbone: {len(mismatched)} tensors have other shapes "
            f"(is it for another architecture?): {'; '.join(mismatched[:3])}"
        )
    backbone.load_state_dict(renamed, strict=False)
    return LoadReport(
        path=str(path),
        prefix_stripped=prefix,
        loaded=len(renamed),
        missing=[k for k in wanted if k not in renamed],
        unexpected=unexpected,
        ignored_head=ignored,
    )
