"""Slide-level aggregators for multiple-instance learning (MIL) on tile features.

A slide is a bag of tile feature vectors (N, D) with one label. An aggregator turns the bag
into class logits and says how much each tile weighed:

- ``abmil``: gated attention MIL (Ilse, Tomczak and Welling, ICML 2018). Tiles are embedded
  (D -> H), scored by a gated attention network ``w^T (tanh(V h) * sigmoid(U h))``, softmaxed
  over the bag, and the weighted sum of embeddings is classified. With ``multi_branch`` there
  is one attention branch (and one scorer) per class, as in CLAM-MB (Lu et al. 2021).
- ``transmil``: the correlated-MIL transformer of Shao et al. (NeurIPS 2021): embed, pad the
  sequence to a square grid, add a class token, transformer layer, a position generator of
  depthwise convolutions on the grid (PPEG, kernels 7/5/3), a second transformer layer, and
  classify the class token. Shao et al. use Nystrom attention to reach long sequences; this
  implementation uses plain (exact) multi-head attention through
  ``scaled_dot_product_attention``, which is fine for CPU-sized bags and memory-efficient on
  GPUs. Tile attention is the class token's attention row of the last layer, averaged over
  heads.
- ``mean``: mean of the embedded tiles, then a linear classifier: the floor every paper
  reports. Its "attention" is uniform.

Imports nothing from training: ``predict`` builds these models from a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AGGREGATORS = ("abmil", "transmil", "mean")
MIL_MODEL_KIND = "mil"


@dataclass(frozen=True, kw_only=True)
class MILModelConfig:
    """The architecture of a slide-level model (stored in its checkpoint)."""

    aggregator: str = "abmil"
    in_dim: int
    n_classes: int
    hidden_dim: int = 256
    attention_dim: int = 128  # gated attention's inner width (abmil)
    dropout: float = 0.25
    multi_branch: bool = False  # abmil: one attention branch per class
    heads: int = 8  # transmil
    # What made the features: checked against every feature file that meets the model.
    encoder: str = ""
    encoder_weights_sha256: str = ""
    encoder_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if self.in_dim < 1 or self.n_classes < 2 or self.hidden_dim < 1:
            raise ValueError("in_dim, hidden_dim must be >= 1 and n_classes >= 2")
        if self.aggregator == "transmil" and self.hidden_dim % self.heads:
            raise ValueError(f"transmil: hidden_dim {self.hidden_dim} must divide by {self.heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def attention_columns(self) -> int:
        """Attention values per tile: one per class for a multi-branch model, else one."""
        return self.n_classes if self.aggregator == "abmil" and self.multi_branch else 1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": MIL_MODEL_KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MILModelConfig:
        data = {k: v for k, v in data.items() if k != "kind"}
        return cls(**data)


def _modules():  # noqa: ANN202 - torch is imported lazily (the CLI's --help stays instant)
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    def embedder(config: MILModelConfig) -> nn.Module:
        return nn.Sequential(
            nn.Linear(config.in_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout)
        )

    class GatedAttentionMIL(nn.Module):
        def __init__(self, config: MILModelConfig) -> None:
            super().__init__()
            self.config = config
            branches = config.attention_columns
            self.embed = embedder(config)
            self.attention_v = nn.Linear(config.hidden_dim, config.attention_dim)
            self.attention_u = nn.Linear(config.hidden_dim, config.attention_dim)
            self.attention_w = nn.Linear(config.attention_dim, branches)
            if branches > 1:
                # One scorer per class reads that class's pooled embedding (CLAM-MB style).
                self.classifiers = nn.Parameter(torch.zeros(branches, config.hidden_dim))
                self.bias = nn.Parameter(torch.zeros(branches))
                nn.init.normal_(self.classifiers, std=1.0 / math.sqrt(config.hidden_dim))
            else:
                self.classifier = nn.Linear(config.hidden_dim, config.n_classes)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.embed(x)  # (N, H)
            gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
            attention = torch.softmax(self.attention_w(gate), dim=0)  # (N, K): sums to 1
            pooled = attention.transpose(0, 1) @ h  # (K, H)
            if attention.shape[1] > 1:
                logits = (pooled * self.classifiers).sum(dim=1) + self.bias
            else:
                logits = self.classifier(pooled[0])
            return logits, attention

    class MeanMIL(nn.Module):
        def __init__(self, config: MILModelConfig) -> None:
            super().__init__()
            self.config = config
            self.embed = embedder(config)
            self.classifier = nn.Linear(config.hidden_dim, config.n_classes)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.embed(x)
            attention = torch.full((x.shape[0], 1), 1.0 / x.shape[0], device=x.device)
            return self.classifier(h.mean(dim=0)), attention

    class SelfAttentionLayer(nn.Module):
        """Pre-norm multi-head self-attention with a residual (Shao et al.'s TransLayer)."""

        def __init__(self, dim: int, heads: int, dropout: float) -> None:
            super().__init__()
            self.heads = heads
            self.norm = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.out = nn.Linear(dim, dim)
            self.dropout = dropout

        def forward(
            self, x: torch.Tensor, want_cls_attention: bool = False
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            n, dim = x.shape
            q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, dim // self.heads).unbind(1)
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, n, d)
            drop = self.dropout if self.training else 0.0
            mixed = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
            x = x + self.out(mixed.transpose(0, 1).reshape(n, dim))
            cls_attention = None
            if want_cls_attention:
                # Only the class token's row: O(n), where the full matrix would be O(n^2).
                scores = (q[:, :1] @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
                cls_attention = torch.softmax(scores, dim=-1)[:, 0].mean(dim=0)  # (n,)
            return x, cls_attention

    class PositionGenerator(nn.Module):
        """PPEG: depthwise 7/5/3 convolutions over the tokens laid out on a square grid."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3)
            )

        def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
            cls, rest = tokens[:1], tokens[1:]
            grid = rest.transpose(0, 1).reshape(1, -1, side, side)
            grid = grid + sum(conv(grid) for conv in self.convs)
            return torch.cat([cls, grid.reshape(-1, side * side).transpose(0, 1)], dim=0)

    class TransMIL(nn.Module):
        def __init__(self, config: MILModelConfig) -> None:
            super().__init__()
            self.config = config
            dim = config.hidden_dim
            self.embed = embedder(config)
            self.cls_token = nn.Parameter(torch.zeros(1, dim))
            nn.init.normal_(self.cls_token, std=0.02)
            self.layer1 = SelfAttentionLayer(dim, config.heads, config.dropout)
            self.position = PositionGenerator(dim)
            self.layer2 = SelfAttentionLayer(dim, config.heads, config.dropout)
            self.norm = nn.LayerNorm(dim)
            self.classifier = nn.Linear(dim, config.n_classes)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = x.shape[0]
            h = self.embed(x)
            side = max(1, math.ceil(math.sqrt(n)))
            # Pad to a square by repeating the first tiles (as the paper does).
            padding = side * side - n
            if padding:
                h = torch.cat([h, h[torch.arange(padding, device=h.device) % n]], dim=0)
            tokens = torch.cat([self.cls_token, h], dim=0)
            tokens, _ = self.layer1(tokens)
            tokens = self.position(tokens, side)
            tokens, cls_attention = self.layer2(tokens, want_cls_attention=True)
            logits = self.classifier(self.norm(tokens[0]))
            assert cls_attention is not None
            # Fold padded copies back onto the tiles they repeat, renormalise over tiles.
            per_tile = cls_attention[1 : n + 1].clone()
            if padding:
                per_tile.index_add_(
                    0,
                    torch.arange(padding, device=x.device) % n,
                    cls_attention[n + 1 :],
                )
            per_tile = per_tile / per_tile.sum().clamp_min(1e-12)
            return logits, per_tile[:, None]

    return {"abmil": GatedAttentionMIL, "transmil": TransMIL, "mean": MeanMIL}


def build_mil_model(config: MILModelConfig) -> Any:
    """The aggregator as a torch module: ``model(features (N, D)) -> (logits (C,),
    attention (N, K))`` with K = 1, or one column per class for a multi-branch ABMIL."""
    return _modules()[config.aggregator](config)


def is_mil_checkpoint_meta(model_config: dict[str, Any]) -> bool:
    return model_config.get("kind") == MIL_MODEL_KIND


def load_mil_model(path: str | Path, map_location: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, CheckpointMeta) from a ``train-mil`` checkpoint (safetensors)."""
    from histoduo.models.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint

    payload = load_checkpoint(path, map_location)
    meta = CheckpointMeta.from_dict(payload["meta"])
    if not is_mil_checkpoint_meta(meta.model_config):
        raise CheckpointError(
            path, "not a slide-level (train-mil) checkpoint; pass a tile model with --model"
        )
    try:
        config = MILModelConfig.from_dict(meta.model_config)
        model = build_mil_model(config)
        model.load_state_dict(payload["model_state"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(path, f"the stored slide model is not usable ({exc})") from exc
    model.eval()
    return model, meta


def mil_predict(model: Any, features: Any) -> tuple[Any, Any]:
    """(class probabilities (C,), attention (N, K)) as numpy, for one bag, without gradients."""
    import numpy as np
    import torch

    with torch.inference_mode():
        tensor = torch.as_tensor(np.asarray(features, dtype=np.float32))
        logits, attention = model(tensor)
        return torch.softmax(logits, dim=-1).numpy(), attention.numpy()
