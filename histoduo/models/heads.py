"""Tile classifiers on cached encoder features (``train --features``), and the pair
encoder + head that classifies tiles at predict time.

A head's config names the encoder that made its features and the sha256 of that encoder's
weights file: predicting from tiles needs the same encoder, rebuilt from the user's local
weights (``--encoder-weights``), and a file with another hash is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from histoduo.models.config import FEATURE_ARCHS

if TYPE_CHECKING:
    from histoduo.models.config import ModelConfig
    from histoduo.models.encoders import Encoder

HEAD_ARCHS: tuple[str, ...] = ("linear", "mlp")


class FeatureHead(nn.Module):
    """(B, D) features -> (B, K) logits: a linear probe, or one hidden layer (``mlp``).

    ``forward_features`` is the input of the final linear ``head`` (as in every histoduo
    classifier), so a head checkpoint can itself serve as an encoder.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.features_dim < 1 or not config.encoder:
            raise ValueError(
                f"arch {config.arch!r} is a head on cached encoder features: train it with "
                "--features DIR/features_<encoder> (written by histoduo embed)"
            )
        self.config = config
        width = config.features_dim
        self.body: nn.Module
        if config.arch == "mlp":
            self.body = nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, config.hidden_dim),
                nn.GELU(),
                nn.Dropout(config.dropout),
            )
            width = config.hidden_dim
        else:
            self.body = nn.LayerNorm(width)  # features of big ViTs have large, uneven scales
        self.head = nn.Linear(width, config.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class EncodedClassifier(nn.Module):
    """Tiles -> logits: the encoder that made the training features, then the head."""

    def __init__(self, encoder: Encoder, head: FeatureHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head_model = head
        self.config = head.config

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_model.forward_features(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_model(self.encoder(x))


def with_encoder(
    head: FeatureHead, weights: str | Path | None, checkpoint: str | Path
) -> nn.Module:
    """The head behind the encoder that made its training features, from the user's local
    weights; a weights file with another sha256 than the features' is refused (checked
    before the model is built)."""
    from histoduo.models.encoders import (
        EncoderError,
        build_encoder,
        resolve_encoder,
        resolve_weights_file,
        sha256_file,
    )

    config = head.config
    expected = config.encoder_weights_sha256
    if weights is None:
        raise EncoderError(
            checkpoint,
            f"this head classifies {config.encoder} features: pass that encoder's weights "
            f"with --encoder-weights FILE (sha256 {expected[:16]}...)",
        )
    from histoduo.models.encoders.build import CHECKPOINT_SUFFIXES

    # A histoduo checkpoint as encoder is its own weights: rebuild it from the file the user
    # passes (wherever it lives now); the hash below proves it is the same checkpoint.
    from_checkpoint = Path(str(config.encoder)).suffix in CHECKPOINT_SUFFIXES
    spec = resolve_encoder(str(weights) if from_checkpoint else str(config.encoder))
    file = Path(spec.checkpoint) if spec.checkpoint else resolve_weights_file(weights)
    digest = sha256_file(file)
    if expected and digest != expected:
        raise EncoderError(
            file,
            f"sha256 {digest[:16]}... is not the {expected[:16]}... of the weights that made "
            f"this head's training features ({checkpoint}): another model or version",
        )
    return EncodedClassifier(build_encoder(spec, weights), head).eval()


def load_tile_model(
    path: str | Path,
    map_location: str = "cpu",
    *,
    trust: bool = False,
    encoder_weights: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """(model that takes tiles, meta) from a checkpoint: a head on cached features gets its
    encoder in front, rebuilt from ``encoder_weights`` (the user's file, hash-checked); any
    other model takes tiles already."""
    from histoduo.models.checkpoint import CheckpointError, load_model
    from histoduo.models.encoders import EncoderError

    model, meta = load_model(path, map_location, trust=trust, encoder_weights=encoder_weights)
    if meta.model_config.get("arch") in FEATURE_ARCHS:
        try:
            model = with_encoder(model, encoder_weights, path)
        except EncoderError as exc:
            raise CheckpointError(exc.path, exc.reason) from exc
    return model, meta
