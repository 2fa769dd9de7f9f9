"""Baselines trained with the same loop: CNN + linear head, and a hybrid CNN + ViT."""

from __future__ import annotations

import torch
from torch import nn

from histoduo.models.backbone import StageInfo
from histoduo.models.blocks import LAYER_NORM_EPS, Block, drop_path_rates
from histoduo.models.config import ModelConfig
from histoduo.models.duoformer import HistoClassifier, _init_transformer_weights


class CNNClassifier(HistoClassifier):
    """``resnet``: the CNN's last map, global average pool, linear head (linear probe if frozen)."""

    def __init__(self, config: ModelConfig, backbone: nn.Module, stage: StageInfo) -> None:
        super().__init__(config, backbone)
        self.stage = stage
        self.head = nn.Linear(stage.channels, config.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1].mean(dim=(2, 3))


class HybridViT(HistoClassifier):
    """``hybrid``: last map -> 1x1 conv to D -> tokens + CLS + pos embed -> pre-norm ViT."""

    def __init__(self, config: ModelConfig, backbone: nn.Module, stage: StageInfo) -> None:
        super().__init__(config, backbone)
        if config.input_size_px % stage.stride_px:
            raise ValueError(
                f"input size {config.input_size_px} px is not a multiple of the backbone's "
                f"last-stage stride {stage.stride_px} px"
            )
        dim = config.embed_dim
        self.stage = stage
        self.num_patches = (config.input_size_px // stage.stride_px) ** 2
        self.proj = nn.Linear(stage.channels, dim)  # a 1x1 conv applied on tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.patch_heads,
                mlp_ratio=config.mlp_ratio,
                proj_drop=config.dropout,
                attn_drop=config.attn_dropout,
                drop_path=rate,
            )
            for rate in drop_path_rates(config.drop_path, config.patch_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, config.num_classes)
        for name, module in self.named_children():
            if name != "backbone":
                module.apply(_init_transformer_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        tokens = self.proj(self.backbone(x)[-1].flatten(2).transpose(1, 2))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0])
