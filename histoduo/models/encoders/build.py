"""From an encoder name (or checkpoint) to a module that maps tiles to one vector each."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoduo.models.encoders.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TIMM_PREFIX,
    EncoderError,
    EncoderSpec,
    get_encoder_spec,
)
from histoduo.models.encoders.weights import (
    fit_state_dict,
    read_tensors,
    resolve_weights_file,
    sha256_file,
)
from histoduo.runtime.torchcompat import import_timm

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".safetensors")


def _layer(name: str) -> Any:
    timm = import_timm()
    layers = {
        "swiglu_packed": timm.layers.SwiGLUPacked,
        "swiglu": timm.layers.SwiGLU,
        "silu": nn.SiLU,
        "gelu": nn.GELU,
    }
    if name not in layers:
        raise ValueError(f"unknown layer name {name!r}; known: {', '.join(layers)}")
    return layers[name]


def timm_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    """The spec's keyword arguments with layer names turned into layer classes."""
    kwargs = dict(spec.timm_kwargs)
    for key in ("mlp_layer", "act_layer", "norm_layer"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = _layer(kwargs[key])
    kwargs.setdefault("num_classes", 0)
    return kwargs


def create_trunk(spec: EncoderSpec, *, init: bool = True) -> nn.Module:
    """The timm model of a spec, without weights. ``init=False`` skips timm's weight init
    where the model allows it (the meta-device builds that only count, and the builds whose
    every tensor a weights file is about to replace)."""
    timm = import_timm()
    kwargs = timm_kwargs(spec)
    try:
        if not init:
            try:
                return timm.create_model(
                    spec.timm_name, pretrained=False, weight_init="skip", **kwargs
                )
            except TypeError:  # not a ViT-family model: no weight_init argument
                pass
        return timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as err:
        raise EncoderError(spec.name, f"timm cannot build {spec.timm_name} ({err})") from err


def count_parameters(spec: EncoderSpec) -> int:
    """Parameters of the encoder's trunk, built on the meta device (no memory, no init)."""
    if spec.checkpoint is not None:
        raise ValueError("count a checkpoint encoder's parameters from the loaded model")
    with torch.device("meta"):
        trunk = create_trunk(spec, init=False)
    return sum(p.numel() for p in trunk.parameters())


def _timm_spec(name: str) -> EncoderSpec:
    """``timm:<model>``: the model's own pooled output; input and normalisation from its
    pretrained config (ImageNet statistics when it has none)."""
    timm_name = name[len(TIMM_PREFIX) :]
    timm = import_timm()
    if not timm_name or not timm.is_model(timm_name):
        raise EncoderError(name, f"timm has no model called {timm_name!r}")
    base = EncoderSpec(name=name, timm_name=timm_name, embedding_dim=1)
    with torch.device("meta"):
        trunk = create_trunk(base, init=False)
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    return replace(
        base,
        embedding_dim=int(trunk.num_features),
        input_size_px=int(size),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
        licence="per the timm model's weights (a local file you pass)",
    )


def _checkpoint_spec(path: Path) -> EncoderSpec:
    """A histoduo checkpoint as encoder: its classifier's pooled features (the head input)."""
    from histoduo.models.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint

    try:
        payload = load_checkpoint(path)
        meta = CheckpointMeta.from_dict(payload["meta"])
    except CheckpointError as err:
        raise EncoderError(path, err.reason) from err
    state = payload["model_state"]
    head = state.get("head.weight")
    if head is None or head.ndim != 2:
        raise EncoderError(path, "checkpoint has no linear head to take the features before")
    arch = meta.model_config.get("arch", "?")
    backbone = meta.model_config.get("backbone", "?")
    return EncoderSpec(
        name=f"histoduo-{path.parent.name}-{path.stem}" if path.parent.name else path.stem,
        timm_name=str(backbone),
        timm_kwargs={"arch": arch},
        embedding_dim=int(head.shape[1]),
        pooling="histoduo",
        input_size_px=int(meta.input_size_px),
        mpp=float(meta.target_mpp),
        mean=tuple(meta.mean),  # type: ignore[arg-type]
        std=tuple(meta.std),  # type: ignore[arg-type]
        licence="your own histoduo checkpoint",
        checkpoint=str(path),
    )


def resolve_encoder(name: str | Path) -> EncoderSpec:
    """A registry name, ``timm:<model>``, or a histoduo checkpoint file -> its spec."""
    text = str(name)
    if text.startswith(TIMM_PREFIX):
        return _timm_spec(text)
    path = Path(text).expanduser()
    if path.suffix in CHECKPOINT_SUFFIXES and (path.is_file() or "/" in text):
        if not path.is_file():
            raise EncoderError(path, "checkpoint not found")
        return _checkpoint_spec(path)
    return get_encoder_spec(text)


class Encoder(nn.Module):
    """Tiles (B, 3, S, S) normalised -> embeddings (B, D), as the spec's pooling says."""

    def __init__(self, spec: EncoderSpec, trunk: nn.Module, weights_sha256: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.weights_sha256 = weights_sha256

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "cls_mean":
            tokens = self.trunk.forward_features(x)
            prefix = int(getattr(self.trunk, "num_prefix_tokens", 1))
            return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)
        if self.spec.pooling == "histoduo":
            return self.trunk.forward_features(x)
        return self.trunk(x)


def _no_meta_left(module: nn.Module) -> bool:
    return not any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def load_trunk_weights(spec: EncoderSpec, weights: str | Path) -> tuple[nn.Module, str, str]:
    """(trunk with the file's weights, resolved file, its sha256). The trunk is built on the
    meta device and takes the file's tensors in place (no random init of a billion
    parameters only to overwrite them)."""
    file = resolve_weights_file(weights)
    tensors = read_tensors(file)
    with torch.device("meta"):
        trunk = create_trunk(spec, init=False)
    report = fit_state_dict(trunk, tensors, file)
    trunk.load_state_dict(report.state, assign=True)
    if not _no_meta_left(trunk):  # non-persistent buffers exist only in a real build
        trunk = create_trunk(spec)
        trunk.load_state_dict(report.state)
    log.info("encoder %s: %s", spec.name, report.summary())
    return trunk, str(file), sha256_file(file)


def build_encoder(
    spec: EncoderSpec, weights: str | Path | None = None, *, random_init: bool = False
) -> Encoder:
    """The encoder in eval mode with its weights: a local file (or folder), or the
    checkpoint the spec is. ``random_init`` (tests, benchmarks) builds without weights."""
    if spec.checkpoint is not None:
        from histoduo.models.checkpoint import CheckpointError, load_model

        if weights is not None and Path(weights).resolve() != Path(spec.checkpoint).resolve():
            raise EncoderError(weights, "a checkpoint encoder carries its own weights")
        try:
            model, _ = load_model(spec.checkpoint)
        except CheckpointError as err:
            raise EncoderError(spec.checkpoint, err.reason) from err
        return Encoder(spec, model, sha256_file(spec.checkpoint)).eval()
    if weights is None:
        if not random_init:
            raise EncoderError(
                spec.name,
                f"needs a local weights file (--weights PATH); download it yourself from "
                f"{spec.source or 'its model card'} (weights are never downloaded here)",
            )
        return Encoder(spec, create_trunk(spec)).eval()
    trunk, _, digest = load_trunk_weights(spec, weights)
    return Encoder(spec, trunk, digest).eval()


@dataclass(frozen=True)
class EncoderSummary:
    """One row of ``histoduo encoders``."""

    spec: EncoderSpec
    params: int

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.spec.describe(),
            "params": self.params,
            "published_params_m": self.spec.published_params_m,
            "licence": self.spec.licence,
            "source": self.spec.source,
            "gated": self.spec.gated,
        }


def summarize_encoders(specs: list[EncoderSpec]) -> list[EncoderSummary]:
    """Each spec with its parameter count (meta-device builds: about a second for all)."""
    return [EncoderSummary(spec, count_parameters(spec)) for spec in specs]
