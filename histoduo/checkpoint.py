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
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from histoduo.run.errors import HistoduoError
from histoduo.run.files import atomic_write_bytes

CHECKPOINT_FORMAT = "histoduo-checkpoint"
CHECKPOINT_VERSION = 2
PICKLE_VERSION = 1  # the torch.save format of histoduo before safetensors checkpoints
TRUST_FLAG = "--trust-checkpoint"

_NORMAL_NAMES = {"normal", "benign", "healthy", "non_tumor", "non-tumor", "nontumor", "stroma"}
_NECROSIS_NAMES = {"necrosis", "necrotic"}
_LOW_WORDS = ("low",)
_HIGH_WORDS = ("high",)
# safetensors caps its JSON header at 100 MB; a bigger claimed header is a corrupt file.
_MAX_HEADER_BYTES = 100_000_000
_MODEL_PREFIX = "model_state/"
_TRAIN_PREFIX = "train_state/"


class CheckpointError(HistoduoError):
    """A file is not a usable histoduo checkpoint; the message names the file."""


@dataclass
class ClassRoles:
    """What each class means for slide-level grading.

    ``grades`` are tumour classes ordered from lowest to highest grade (one entry = tumour
    without grades, e.g. TCGA's "cancer"); ``normal`` and ``necrosis`` are reported as area
    fractions; ``other`` classes are ignored by the grade rule.
    """

    grades: list[str] = field(default_factory=list)
    normal: list[str] = field(default_factory=list)
    necrosis: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, list[str]]) -> ClassRoles:
        return cls(**{k: list(v) for k, v in data.items()})

    def validate(self, class_names: list[str]) -> None:
        named = self.grades + self.normal + self.necrosis + self.other
        unknown = sorted(set(named) - set(class_names))
        if unknown:
            raise ValueError(f"class roles name unknown classes {unknown}; classes: {class_names}")
        twice = sorted({n for n in named if named.count(n) > 1})
        if twice:
            raise ValueError(f"classes given more than one role: {twice}")

    @classmethod
    def infer(cls, class_names: list[str], grades: list[str] | None = None) -> ClassRoles:
        """Roles from class names: normal/benign, necrosis, and grades ordered low -> high
        (``low_grade`` < ``high_grade``; ``grade_1`` < ``grade_2``; ``G1`` < ``G4``).

        ``grades`` overrides the inferred grade order; every other class that is neither
        normal nor necrosis is a tumour grade of its own only if nothing else is a grade.
        """
        roles = cls()
        rest: list[str] = []
        for name in class_names:
            key = name.strip().lower()
            if grades is not None and name in grades:
                continue
            if key in _NORMAL_NAMES:
                roles.normal.append(name)
            elif key in _NECROSIS_NAMES:
                roles.necrosis.append(name)
            else:
                rest.append(name)
        if grades is not None:
            roles.grades = list(grades)
            roles.other = rest
        else:
            graded = [n for n in rest if _grade_rank(n) is not None]
            roles.grades = sorted(graded, key=lambda n: _grade_rank(n) or 0.0)
            roles.other = [n for n in rest if n not in graded]
            if not roles.grades and len(roles.other) == 1:
                roles.grades, roles.other = roles.other, []  # e.g. "cancer", "tumor"
        roles.validate(class_names)
        return roles


def _grade_rank(name: str) -> float | None:
    key = name.strip().lower()
    number = re.search(r"(?:grade|^g)[ _-]?(\d)", key)
    if number:
        return float(number.group(1))
    if any(word in key for word in _LOW_WORDS):
        return 1.0
    if any(word in key for word in _HIGH_WORDS):
        return 3.0
    if "grade" in key or "tumo" in key or "cancer" in key or "carcinoma" in key:
        return 2.0
    return None


@dataclass
class CheckpointMeta:
    """Everything about a trained model except its weights."""

    model_config: dict[str, Any]
    class_names: list[str]
    class_roles: dict[str, list[str]]
    target_mpp: float
    tile_size_px: int
    input_size_px: int
    mean: list[float]
    std: list[float]
    eval_resize: str = "resize"  # how a tile becomes model input: "resize" or "center_crop"
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    # {class id: name people read, e.g. "ISUP grade 3-4"}; missing classes get a default
    # derived from the id (histoduo.display). Absent in older checkpoints.
    class_display_names: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        data = dict(data)
        data["class_display_names"] = {
            str(k): str(v) for k, v in (data.get("class_display_names") or {}).items()
        }
        return cls(**data)

    @property
    def roles(self) -> ClassRoles:
        return ClassRoles.from_dict(self.class_roles)


# --- plain-type encoding of training state ------------------------------------------------
# JSON has no tensors, tuples or int dict keys, and optimizer state needs all three (its
# ``state`` is keyed by parameter index). Tagged objects keep them; decoding accepts only
# these tags, JSON scalars, lists and str-keyed dicts.
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


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch-zip', 'torch-pickle' (old torch.save) or 'unknown', from the
    first bytes only (nothing is parsed or unpickled)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
        size = os.fstat(handle.fileno()).st_size
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-pickle"
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + header_len <= size and header_len <= _MAX_HEADER_BYTES:
            return "safetensors"
    return "unknown"


def _pickle_names_histoduo(path: Path) -> bool:
    """Whether a torch zip file's pickle mentions our format tag, read with ``pickletools``
    (which lists opcodes and never builds objects, so nothing runs)."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            data = archive.read(name)
        return any(arg == CHECKPOINT_FORMAT for _, arg, _ in pickletools.genops(data))
    except Exception:  # not a zip, no pickle, a malformed pickle: just not recognised
        return False


def untrusted_pickle_error(path: Path, what: str = "checkpoint") -> CheckpointError:
    return CheckpointError(
        path,
        f"this {what} is a pickle (torch.save), and loading a pickle can run any code it "
        f"contains. histoduo does not load pickles unless told to: if you trust where the "
        f"file comes from, pass {TRUST_FLAG} (and resave it with `histoduo "
        f"convert-checkpoint` for checkpoints, or as .safetensors for weights)",
    )


def warn_trusted_pickle(path: Path) -> None:
    # Straight to stderr, not a logger nobody configured: this warning must be seen.
    print(
        f"warning: {path} is a pickle; loading it with {TRUST_FLAG} runs any code inside it. "
        "Only do this for files from a source you trust.",
        file=sys.stderr,
    )


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


def load_checkpoint(
    path: str | Path, map_location: str = "cpu", *, trust: bool = False
) -> dict[str, Any]:
    """The checkpoint dict, or a CheckpointError saying why the file is not one.

    Pickled (format 1) files load only with ``trust``: unpickling can execute code.
    """
    path = Path(path)
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
            if kind == "torch-zip" and not _pickle_names_histoduo(path):
                raise _foreign(path)
            raise untrusted_pickle_error(path)
        payload = _load_pickled(path, map_location)
    elif path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes)")
    else:
        raise CheckpointError(
            path, "not a histoduo checkpoint (neither a safetensors nor a torch file)"
        )
    try:
        CheckpointMeta.from_dict(payload["meta"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(path, f"checkpoint metadata is incomplete ({exc})") from exc
    return payload


def load_model(
    path: str | Path,
    map_location: str = "cpu",
    *,
    trust: bool = False,
    encoder_weights: str | Path | None = None,
    for_tiles: bool = False,
) -> tuple[Any, CheckpointMeta]:
    """(model in eval mode, meta) rebuilt from a checkpoint alone.

    A head on cached features (arch linear/mlp) takes features; ``for_tiles`` puts its
    encoder in front, rebuilt from ``encoder_weights`` (the user's file, hash-checked)."""
    from histoduo.models import ModelConfig, build_model

    payload = load_checkpoint(path, map_location, trust=trust)
    meta = CheckpointMeta.from_dict(payload["meta"])
    # The state dict holds the backbone; never re-read the original weights file.
    try:
        config = ModelConfig.from_dict(meta.model_config).replace(backbone_weights=None)
        model = build_model(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(path, f"the stored model config is not usable ({exc})") from exc
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit the stored model config ({exc})") from exc
    model.eval()
    if for_tiles and config.arch in ("linear", "mlp"):
        from histoduo.models.encoders import EncoderError
        from histoduo.models.heads import with_encoder

        try:
            model = with_encoder(model, encoder_weights, path)
        except EncoderError as exc:
            raise CheckpointError(exc.path, exc.reason) from exc
    return model, meta


def convert_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Resave a (trusted) format-1 pickle checkpoint as a safetensors checkpoint."""
    payload = load_checkpoint(source, trust=True)
    meta = CheckpointMeta.from_dict(payload["meta"])
    return save_checkpoint(target, payload["model_state"], meta, payload.get("train_state"))
