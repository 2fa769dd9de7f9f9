"""Tile classifiers on cached encoder features (``train --features``), and the pair
encoder + head that classifies tiles at predict time.

A head's config names the encoder that made its features and the sha256 of that encoder's
weights file: predicting from tiles needs the same encoder, rebuilt from the user's local
weights (``--encoder-weights``), and a file with another hash is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

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
        if config.features_dim < 1:
            raise ValueError("a feature head needs features_dim (the encoder's embedding size)")
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
