"""histoduo checkpoints: weights plus everything needed to use them without repeating flags.

A checkpoint is a `safetensors <https://github.com/huggingface/safetensors>`_ file (the
``.pt`` name is kept so runs stay ``best.pt`` / ``last.pt``). Loading one never runs code:
the tensors are raw little-endian buffers and everything else is JSON in the safetensors
header (``__metadata__``)::

    format            "histoduo-checkpoint"
    format_version    "2"
    histoduo          JSON: {"histoduo_version", "meta", "train_state"}
                      meta: CheckpointMeta.to_dict(): model config, class names and roles,
                      mpp, tile and input size, normalisation, training config, metrics, epoch
                      train_state (optional, for --resume): optimizer / scheduler state, epoch,
                      history and RNG states, encoded by :func:`_encode` (tensors are
                      references into the file, tuples and int-keyed dicts are tagged)
    tensors           "model_state/<name>" (the model's state_dict, backbone included) and
                      "train_state/<n>" (the optimizer's moment buffers, the torch RNG state)

Format 1 checkpoints (histoduo 0.1, a ``torch.save`` pickle) can execute arbitrary code
when unpickled; :func:`load_checkpoint` reads them only with ``trust=True``
(``--trust-checkpoint``) and warns. Resave them with ``histoduo convert-checkpoint``.

``predict`` tiles slides from ``meta`` (mpp, tile size) and builds the model from
``meta.model_config``, so a checkpoint rebuilds the identical model with no flags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from histoduo.models.config import FEATURE_ARCHS
from histoduo.models.meta import CheckpointMeta, check_meta  # noqa: F401 - re-exported
from histoduo.models.pickles import (  # noqa: F401 - re-exported
    CHECKPOINT_FORMAT,
    MAX_HEADER_BYTES,
    TRUST_FLAG,
    CheckpointError,
    pickle_names_histoduo,
    sniff_format,
    untrusted_pickle_error,
    warn_trusted_pickle,
)
from histoduo.runtime.errors import HistoduoError
from histoduo.runtime.files import atomic_write_bytes

CHECKPOINT_VERSION = 2
PICKLE_VERSION = 1  # the torch.save format of histoduo before safetensors checkpoints

_MODEL_PREFIX = "model_state/"
_TRAIN_PREFIX = "train_state/"


_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"
_ITEMS_TAG = "__items__"
_ARRAY_TAG = "__ndarray__"
_TAGS = (_TENSOR_TAG, _TUPLE_TAG, _ITEMS_TAG, _ARRAY_TAG)


def _encode(value: Any, tensors: dict[str, Any]) -> Any:
    """``value`` as JSON-ready plain types; tensors move into ``tensors`` by reference."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        name = f"{_TRAIN_PREFIX}{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR_TAG: name}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"cannot store a numpy array of dtype {value.dtype}")
        return {_ARRAY_TAG: value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(t in value for t in _TAGS):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {_ITEMS_TAG: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def _decode(value: Any, tensors: dict[str, Any]) -> Any:
    import numpy as np

    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR_TAG in value:
        return tensors[value[_TENSOR_TAG]]
    if _TUPLE_TAG in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE_TAG])
    if _ITEMS_TAG in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS_TAG]}
    if _ARRAY_TAG in value:
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"numpy dtype {dtype} is not allowed")
        return np.asarray(value[_ARRAY_TAG], dtype=dtype)
    return {k: _decode(v, tensors) for k, v in value.items()}


def _unshared(state: dict[str, Any]) -> dict[str, Any]:
    """CPU, contiguous tensors; safetensors refuses tensors that share memory (tied weights)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()  # a view into storage another tensor already uses
        seen.add(storage)
        out[name] = tensor
    return out


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, Any],
    meta: CheckpointMeta,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename)."""
    from safetensors.torch import save

    from histoduo import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{_MODEL_PREFIX}{k}": v for k, v in model_state.items()}
    train_tensors: dict[str, Any] = {}
    header: dict[str, Any] = {"histoduo_version": __version__, "meta": meta.to_dict()}
    if train_state is not None:
        header["train_state"] = _encode(train_state, train_tensors)
    tensors.update(train_tensors)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "histoduo": json.dumps(header),
    }
    # Bytes through atomic_write_bytes, not save_file: safetensors creates files 0600, and
    # a checkpoint's mode should follow the umask like every other output.
    atomic_write_bytes(path, save(_unshared(tensors), metadata=metadata))
    return path


# --- loading -------------------------------------------------------------------------------


def _load_pickled(path: Path, map_location: str) -> dict[str, Any]:
    import pickle

    import torch

    warn_trusted_pickle(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(path, f"not a readable torch checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise _foreign(path)
    return payload


def _foreign(path: Path) -> CheckpointError:
    return CheckpointError(
        path,
        "not a histoduo checkpoint (no 'format': 'histoduo-checkpoint'); to use backbone "
        "weights from another project, pass the file with --backbone-weights",
    )


def _load_safetensors(path: Path, map_location: str) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=map_location) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise _foreign(path)
            version = int(metadata.get("format_version", "0"))
            if version > CHECKPOINT_VERSION:
                raise CheckpointError(
                    path,
                    f"checkpoint format {version} is newer than this histoduo; upgrade histoduo",
                )
            header = json.loads(metadata["histoduo"])
            # Check what sizes the model before a single tensor is read.
            check_meta(path, header.get("meta") if isinstance(header, dict) else None)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except CheckpointError:
        raise
    except Exception as exc:  # SafetensorError, JSON errors, missing keys, truncation
        raise CheckpointError(path, f"not a readable histoduo checkpoint ({exc})") from exc
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": version,
        "histoduo_version": header.get("histoduo_version", ""),
        "meta": header.get("meta"),
        "model_state": {
            k[len(_MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)
        },
    }
    if "train_state" in header:
        try:
            payload["train_state"] = _decode(header["train_state"], tensors)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(path, f"training state is damaged ({exc})") from exc
    return payload


def _unreadable_reason(path: Path) -> str:
    """Why a file that is neither safetensors nor a torch file was not read, in words."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        (header_bytes,) = struct.unpack("<Q", head[:8])
        if header_bytes > MAX_HEADER_BYTES:
            return (
                f"its safetensors header claims {header_bytes:,} bytes, more than the "
                f"{MAX_HEADER_BYTES // 1_000_000} MB safetensors allows: the file is corrupt "
                "or not a checkpoint"
            )
        if 8 + header_bytes > size:
            return (
                f"the file is truncated: its safetensors header claims {header_bytes:,} bytes "
                f"but the file has {size:,} (an interrupted copy or download?)"
            )
    return "not a histoduo checkpoint (neither a safetensors nor a torch file)"


def load_checkpoint(
    path: str | Path, map_location: str = "cpu", *, trust: bool = False
) -> dict[str, Any]:
    """The checkpoint dict, or a CheckpointError saying why the file is not one.

    Pickled (format 1) files load only with ``trust``: unpickling can execute code.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        hint = f" (it holds {', '.join(inside[:3])}: pass one of them)" if inside else ""
        raise CheckpointError(path, f"is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        kind = sniff_format(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read the file ({exc})") from exc
    if kind == "safetensors":
        payload = _load_safetensors(path, map_location)
    elif kind in ("torch-zip", "torch-pickle"):
        if not trust:
            if kind == "torch-zip" and not pickle_names_histoduo(path):
                raise _foreign(path)
            raise untrusted_pickle_error(path)
        payload = _load_pickled(path, map_location)
    elif path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes)")
    else:
        raise CheckpointError(path, _unreadable_reason(path))
    if not isinstance(payload.get("meta"), dict):
        raise CheckpointError(path, "checkpoint metadata is incomplete (no 'meta')")
    check_meta(path, payload["meta"])
    return payload


def _check_weights(
    path: Path, config: Any, state: dict[str, Any], may_lack: str | None = None
) -> None:
    """Names, shapes and finiteness of the stored weights against the stored config, on a
    model built on torch's meta device (shapes only, no memory), before the real build.
    ``may_lack``: a prefix of tensors the file leaves out (a foundation-model trunk)."""
    import torch

    from histoduo.models import build_model

    with torch.device("meta"):
        expected = build_model(config).state_dict()
    missing = [k for k in expected if k not in state and not (may_lack and k.startswith(may_lack))]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensors have other shapes ({'; '.join(wrong[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
        raise CheckpointError(
            path, f"weights do not fit the stored model config: {'; '.join(parts)}"
        )
    bad = [
        k
        for k, v in state.items()
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise CheckpointError(
            path,
            f"{len(bad)} weight tensors hold NaN or infinite values (e.g. {bad[0]}): the "
            "training that wrote this checkpoint diverged; use an earlier checkpoint or "
            "retrain with a lower learning rate",
        )


def load_model(
    path: str | Path,
    map_location: str = "cpu",
    *,
    trust: bool = False,
    encoder_weights: str | Path | None = None,
) -> tuple[Any, CheckpointMeta]:
    """(model in eval mode, meta) rebuilt from a checkpoint alone (and, for DuoFormer on a
    foundation-model ViT, the user's ``encoder_weights``, hash-checked).

    A head on cached features (arch linear/mlp) takes features; :func:`histoduo.models.heads.
    load_tile_model` puts its encoder in front for tiles."""
    from histoduo.models import ModelConfig, build_model

    payload = load_checkpoint(path, map_location, trust=trust)
    meta = CheckpointMeta.from_dict(payload["meta"])
    # The state dict holds the backbone; never re-read the original weights file. Except a
    # foundation-model ViT's (DuoFormer on its pyramid): its licence keeps it out of
    # checkpoints, so the user passes the file again and its sha256 must match.
    from histoduo.models.encoders.pyramid import TRUNK_PREFIX, load_shareable_state

    try:
        config = ModelConfig.from_dict(meta.model_config)
        # A foundation-model ViT's weights stay out of checkpoints (their licence).
        foundation = config.arch not in FEATURE_ARCHS and bool(config.encoder_weights_sha256)
        _check_weights(
            Path(path),
            config.replace(backbone_weights=None),
            payload["model_state"],
            may_lack=TRUNK_PREFIX if foundation else None,
        )
        weights = None
        if foundation:
            if encoder_weights is None:
                raise CheckpointError(
                    path,
                    f"DuoFormer on {config.backbone}: the ViT's weights are not in the "
                    "checkpoint (their licence); pass them with --encoder-weights FILE",
                )
            weights = str(encoder_weights)
        model = build_model(config.replace(backbone_weights=weights))
    except HistoduoError as exc:
        raise CheckpointError(exc.path, exc.reason) from exc
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(path, f"the stored model config is not usable ({exc})") from exc
    try:
        load_shareable_state(model, payload["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit the stored model config ({exc})") from exc
    model.eval()
    return model, meta


def convert_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Resave a (trusted) format-1 pickle checkpoint as a safetensors checkpoint."""
    if Path(target).is_dir():
        raise CheckpointError(
            target,
            f"is a folder; give the new checkpoint's file name (e.g. {Path(target) / 'model.pt'})",
        )
    payload = load_checkpoint(source, trust=True)
    meta = CheckpointMeta.from_dict(payload["meta"])
    return save_checkpoint(target, payload["model_state"], meta, payload.get("train_state"))
