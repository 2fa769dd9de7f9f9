"""Pre-attention token interactions (Nguyen et al., arXiv 2412.18778), adapted to DuoFormer.

The paper lets tokens interact *before* self-attention, so that visually similar tokens of
different classes are less alike when their dot products are taken:

- ACP, aggressive convolutional pooling: depthwise convolutions with iterative max-pooling on
  the 2-D token grid widen the receptive field (local-to-regional mixing).
- CAT, conceptual attention transformation: tokens are pooled into a few learned concepts and
  the concepts flow back to every token through a projection (global semantic context).

Both are residual: ``x + proj(f(norm(x)))`` with ``proj`` initialised to zero, so a model with
the modules computes exactly what the model without them computes until it is trained. Both
read the sequence layout from a :class:`TokenLayout`: which token ranges form which 2-D grids
(everything else, e.g. CLS or scale tokens, passes through unchanged) and how many sequences
of the batch belong to one image (``tiles``; the patches of scale attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from histoduo.models.blocks import LAYER_NORM_EPS


@dataclass(frozen=True)
class TokenGrid:
    """``height * width`` consecutive tokens from ``start``, a row-major 2-D grid."""

    start: int
    height: int
    width: int

    @property
    def size(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class TokenLayout:
    """Layout of a B' x L x D token sequence for the interaction modules.

    ``grids``: the token ranges that are 2-D grids (non-overlapping); tokens in no grid pass
    through. ``tiles`` = (rows, cols): the leading batch axis holds ``rows * cols`` consecutive
    sequences per image, laid out row-major as a mosaic; grid ``g`` of every sequence is then
    one tile of a (rows * height) x (cols * width) map and the modules see the whole map
    (and, for CAT, the grid tokens of all tiles of the image as one set). (1, 1) keeps every
    sequence on its own.
    """

    length: int
    grids: tuple[TokenGrid, ...]
    tiles: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        taken: set[int] = set()
        for grid in self.grids:
            span = set(range(grid.start, grid.start + grid.size))
            if grid.height < 1 or grid.width < 1 or grid.start < 0:
                raise ValueError(f"bad token grid {grid}")
            if grid.start + grid.size > self.length or taken & span:
                raise ValueError(f"token grid {grid} overlaps another or leaves L={self.length}")
            taken |= span
        if not self.grids:
            raise ValueError("a token layout needs at least one grid")

    @property
    def num_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    def grid_positions(self) -> list[int]:
        """Sequence positions of all grid tokens, grid by grid (row-major inside each)."""
        return [i for g in self.grids for i in range(g.start, g.start + g.size)]


class _TokenInteraction(nn.Module):
    """Shared plumbing: pre-norm, gather the grid tokens, scatter a zero-init update back."""

    def __init__(self, dim: int, layout: TokenLayout) -> None:
        super().__init__()
        self.layout = layout
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Linear(dim, dim)
        # Zero init: the module is an exact identity at step 0 (the paper config is unchanged).
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        positions = layout.grid_positions()
        # Python-side check (works on the meta device too): no gather/scatter when possible.
        self.covers_all = positions == list(range(layout.length))
        self.register_buffer("grid_idx", torch.tensor(positions), persistent=False)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.layout.length or x.shape[0] % self.layout.num_tiles:
            raise ValueError(
                f"{type(self).__name__} was built for sequences of {self.layout.length} tokens "
                f"in groups of {self.layout.num_tiles}, got {tuple(x.shape)}"
            )

    def _add_to_grid(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """x + update on the grid tokens (update: B' x grid tokens x D, grid order)."""
        update = self.proj(update)
        if self.covers_all:
            return x + update
        return x + torch.zeros_like(x).index_copy(1, self.grid_idx, update)


class AggressiveConvPooling(_TokenInteraction):
    """ACP: depthwise 3x3 conv, then ``levels`` x (depthwise 3x3 conv, GELU, 2x2 max-pool).

    Level 0 is the depthwise conv of the token grid; level l is pooled from level l-1, so it
    sees a 2^l times wider neighbourhood. Every level is brought back to the token grid by
    nearest upsampling (each cell gets its pooled parent), the levels are summed and a
    zero-initialised linear projection adds them to the residual stream. Pooling uses
    ``ceil_mode`` so odd and 1x1 grids keep at least one cell. The convolutions are shared by
    all grids of the layout (they are translation-equivariant and tiny; the stage identity is
    already in the tokens through their projections and positional embedding).
    """

    def __init__(self, dim: int, layout: TokenLayout, levels: int) -> None:
        super().__init__(dim, layout)
        if levels < 1:
            raise ValueError(f"ACP needs at least one pooling level, got {levels}")
        self.levels = levels
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.level_convs = nn.ModuleList(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(levels)
        )
        self.act = nn.GELU()

    def pyramid(self, grid: torch.Tensor) -> torch.Tensor:
        """B x D x H x W -> B x D x H x W: sum of the conv level and every pooled level."""
        height, width = grid.shape[-2:]
        level = self.dwconv(grid)
        out = level
        for depth, conv in enumerate(self.level_convs, start=1):
            level = F.max_pool2d(self.act(conv(level)), 2, ceil_mode=True)
            up = F.interpolate(level, scale_factor=2**depth, mode="nearest")
            out = out + up[..., :height, :width]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        h = self.norm(x)
        rows, cols = self.layout.tiles
        batch = x.shape[0] // (rows * cols)
        dim = x.shape[-1]
        outs = []
        for g in self.layout.grids:
            # B*T x (h w) x D -> B x D x (rows h) x (cols w): the tiles stitched into one map.
            t = h[:, g.start : g.start + g.size].reshape(batch, rows, cols, g.height, g.width, dim)
            grid = t.permute(0, 5, 1, 3, 2, 4).reshape(batch, dim, rows * g.height, cols * g.width)
            y = self.pyramid(grid).reshape(batch, dim, rows, g.height, cols, g.width)
            outs.append(y.permute(0, 2, 4, 3, 5, 1).reshape(batch * rows * cols, g.size, dim))
        return self._add_to_grid(x, torch.cat(outs, dim=1))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, grids={len(self.layout.grids)}, tiles={self.layout.tiles}"


class ConceptualAttention(_TokenInteraction):
    """CAT: K learned concept queries; tokens -> concepts -> tokens through one logit map.

    ``logits[m, k] = norm(token_m) . query_k / sqrt(D)``. Softmax over tokens pools the tokens
    into K concept vectors (each concept attends to the tokens that express it); a small
    K x K linear layer mixes the concepts (identity at init); softmax over concepts sends each
    token the concepts it belongs to (the paper's "backward flow"); a zero-initialised
    projection adds that global context to the residual stream. Cost is O(L * K * D).
    """

    def __init__(self, dim: int, layout: TokenLayout, num_concepts: int) -> None:
        super().__init__(dim, layout)
        if num_concepts < 1:
            raise ValueError(f"CAT needs at least one concept, got {num_concepts}")
        self.num_concepts = num_concepts
        self.scale = 1.0 / math.sqrt(dim)
        # Queries live in the normalised token space: no key projection, which would cost
        # as much as the output projection (a D x D matmul on every token).
        # Unit-variance queries against unit-variance normalised tokens give O(1) logits, so
        # the assignments are not uniform at init (uniform would make all concepts equal).
        self.concepts = nn.Parameter(torch.randn(num_concepts, dim))
        self.mix = nn.Linear(num_concepts, num_concepts)
        nn.init.eye_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        h = self.norm(x)
        if not self.covers_all:
            h = h.index_select(1, self.grid_idx)
        seqs, count, dim = h.shape
        # All grid tokens of one image (every tile) form the set the concepts summarise.
        tokens = h.reshape(seqs // self.layout.num_tiles, -1, dim)
        logits = tokens @ self.concepts.t() * self.scale  # B x M x K
        concepts = logits.softmax(dim=1).transpose(1, 2) @ tokens  # B x K x D
        concepts = self.mix(concepts.transpose(1, 2)).transpose(1, 2)
        context = logits.softmax(dim=2) @ concepts  # B x M x D
        return self._add_to_grid(x, context.reshape(seqs, count, dim))

    def extra_repr(self) -> str:
        return f"concepts={self.num_concepts}, tiles={self.layout.tiles}"


def build_interaction(
    dim: int, layout: TokenLayout, *, acp_levels: int = 0, cat_concepts: int = 0
) -> nn.Module:
    """ACP (local) then CAT (global), as configured; ``nn.Identity`` when both are off."""
    modules: list[nn.Module] = []
    if acp_levels > 0:
        modules.append(AggressiveConvPooling(dim, layout, acp_levels))
    if cat_concepts > 0:
        modules.append(ConceptualAttention(dim, layout, cat_concepts))
    if not modules:
        return nn.Identity()
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def is_interaction_module(module: nn.Module) -> bool:
    """True for the top-level modules :func:`build_interaction` returns (for cost reports)."""
    if isinstance(module, _TokenInteraction):
        return True
    return isinstance(module, nn.Sequential) and all(
        isinstance(m, _TokenInteraction) for m in module
    )
