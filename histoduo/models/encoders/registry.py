"""The encoder registry: what each pathology foundation model is, in timm's terms.

Every entry is a timm constructor plus the keyword arguments of the published weights, so a
local weights file (the user's own download) loads into exactly that architecture. Facts come
from the models' cards; ``published_params_m`` is the count the card (or its paper) reports
and ``tests/test_encoders.py`` checks each entry against it by building on the meta device.

Besides the named entries, ``timm:<name>`` is any timm model (its own pooled output, no
classifier) and a histoduo checkpoint path is its model's pooled embedding (build.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from histoduo.runtime.errors import HistoduoError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# H-optimus-0/1 cards: their own normalisation, not ImageNet's.
_HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

TIMM_PREFIX = "timm:"

# How a trunk's output becomes one vector per tile:
#   "head": timm's own pooled output with num_classes=0 (the class token for these ViTs)
#   "cls_mean": class token concatenated with the mean of the patch tokens (Virchow 1/2;
#               register tokens are excluded from the mean)
#   "histoduo": a histoduo classifier's pooled features, the input of its linear head
Pooling = Literal["head", "cls_mean", "histoduo"]
POOLINGS: tuple[str, ...] = ("head", "cls_mean", "histoduo")


class EncoderError(HistoduoError):
    """An encoder name, weights file or checkpoint that cannot be used; names the input."""


@dataclass(frozen=True, kw_only=True)
class EncoderSpec:
    """One encoder: architecture, embedding, input and provenance.

    ``timm_kwargs`` must stay JSON-able (it is recorded in outputs): layer classes are named
    by the strings ``build.LAYER_NAMES`` knows ("swiglu_packed", "silu").
    """

    name: str
    timm_name: str
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    embedding_dim: int
    pooling: Pooling = "head"
    input_size_px: int = 224
    mpp: float = 0.5  # resolution it was trained at, um/px
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    licence: str = ""  # short; as the card states it when written (docs/encoders.md)
    source: str = ""  # where the user downloads the weights (model card)
    gated: bool = False
    published_params_m: float | None = None  # millions, as published
    checkpoint: str | None = None  # a histoduo checkpoint used as encoder (build.py)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.embedding_dim < 1 or self.input_size_px < 1 or not self.mpp > 0:
            raise ValueError(f"encoder {self.name}: dims, input size and mpp must be positive")

    def describe(self) -> dict[str, Any]:
        """A JSON-able record (what outputs store about the encoder)."""
        return {
            "name": self.name,
            "timm_name": self.timm_name,
            "timm_kwargs": dict(self.timm_kwargs),
            "embedding_dim": self.embedding_dim,
            "pooling": self.pooling,
            "input_size_px": self.input_size_px,
            "mpp": self.mpp,
            "mean": list(self.mean),
            "std": list(self.std),
        }


_VIT_COMMON: dict[str, Any] = {"img_size": 224, "init_values": 1e-5, "num_classes": 0}
_SWIGLU: dict[str, Any] = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_NC_ND = "CC-BY-NC-ND 4.0"  # non-commercial, no redistribution of the weights

_BUILTIN: tuple[EncoderSpec, ...] = (
    EncoderSpec(
        name="uni",
        timm_name="vit_large_patch16_224",
        timm_kwargs={**_VIT_COMMON, "patch_size": 16, "dynamic_img_size": True},
        embedding_dim=1024,
        licence=_NC_ND,
        source="https://huggingface.co/MahmoodLab/UNI",
        gated=True,
        published_params_m=303.4,
    ),
    EncoderSpec(
        name="uni2-h",
        timm_name="vit_giant_patch14_224",
        timm_kwargs={
            **_VIT_COMMON,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        embedding_dim=1536,
        licence=_NC_ND,
        source="https://huggingface.co/MahmoodLab/UNI2-h",
        gated=True,
        published_params_m=681.4,
    ),
    EncoderSpec(
        name="virchow",
        timm_name="vit_huge_patch14_224",
        timm_kwargs={
            **_VIT_COMMON,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        embedding_dim=2560,
        pooling="cls_mean",
        licence="see card",
        source="https://huggingface.co/paige-ai/Virchow",
        gated=True,
        published_params_m=631.2,
    ),
    EncoderSpec(
        name="virchow2",
        timm_name="vit_huge_patch14_224",
        timm_kwargs={
            **_VIT_COMMON,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "reg_tokens": 4,
            **_SWIGLU,
        },
        embedding_dim=2560,
        pooling="cls_mean",
        licence=_NC_ND,
        source="https://huggingface.co/paige-ai/Virchow2",
        gated=True,
        published_params_m=631.2,
    ),
    EncoderSpec(
        name="h-optimus-0",
        timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={**_VIT_COMMON, "dynamic_img_size": False},
        embedding_dim=1536,
        mean=_HOPTIMUS_MEAN,
        std=_HOPTIMUS_STD,
        licence="Apache-2.0",
        source="https://huggingface.co/bioptimus/H-optimus-0",
        gated=True,
        published_params_m=1134.8,
    ),
    EncoderSpec(
        name="h-optimus-1",
        timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={**_VIT_COMMON, "dynamic_img_size": False},
        embedding_dim=1536,
        mean=_HOPTIMUS_MEAN,
        std=_HOPTIMUS_STD,
        licence="see card",
        source="https://huggingface.co/bioptimus/H-optimus-1",
        gated=True,
        published_params_m=None,  # the card says ~1.1B; same architecture as H-optimus-0
    ),
    EncoderSpec(
        name="gigapath",
        timm_name="vit_giant_patch14_dinov2",
        timm_kwargs={
            **_VIT_COMMON,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
        },
        embedding_dim=1536,
        licence="see card",
        source="https://huggingface.co/prov-gigapath/prov-gigapath",
        gated=True,
        published_params_m=1135.0,
    ),
)

_REGISTRY: dict[str, EncoderSpec] = {spec.name: spec for spec in _BUILTIN}


def register_encoder(spec: EncoderSpec, *, replace: bool = False) -> EncoderSpec:
    """Add an entry (tests register tiny ViTs through the same code path as UNI)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    if spec.name.startswith(TIMM_PREFIX):
        raise ValueError(f"encoder names may not start with {TIMM_PREFIX!r}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_encoder(name: str) -> None:
    """Remove an entry added by :func:`register_encoder` (built-ins stay)."""
    if any(spec.name == name for spec in _BUILTIN):
        raise ValueError(f"{name!r} is a built-in encoder")
    _REGISTRY.pop(name, None)


def registered_encoders() -> Iterator[EncoderSpec]:
    """Every named entry, built-ins first."""
    yield from _REGISTRY.values()


def get_encoder_spec(name: str) -> EncoderSpec:
    """A named entry (case-insensitive); the error lists what exists."""
    spec = _REGISTRY.get(name) or _REGISTRY.get(name.lower())
    if spec is None:
        raise EncoderError(
            name,
            f"unknown encoder; known: {', '.join(_REGISTRY)}, or timm:<model name>, or a "
            "histoduo checkpoint file",
        )
    return spec
