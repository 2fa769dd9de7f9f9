"""Model options shared by `model-info` and `train`, and the ModelConfig they describe.

Defaults come from :class:`~histoduo.models.config.ModelConfig` (``MODEL_DEFAULTS``), so the
CLI and the Python API cannot disagree; ``histoduo.models.config`` imports no torch.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from histoduo.cli._app import fail
from histoduo.models.config import ARCHS, ModelConfig

MODEL_DEFAULTS = ModelConfig()

Architecture = Annotated[
    str, typer.Option("--architecture", help="Model to build: " + ", ".join(ARCHS) + ".")
]
# `--model` now means a checkpoint on every command; the old spellings of the architecture
# flag keep working for one release, with a warning.
LegacyArchitecture = Annotated[
    str | None,
    typer.Option("--model", "--arch", hidden=True, help="Deprecated: use --architecture."),
]
LegacyArch = Annotated[
    str | None, typer.Option("--arch", hidden=True, help="Deprecated: use --architecture.")
]
Backbone = Annotated[str, typer.Option("--backbone", help="timm CNN name.")]
BackboneWeights = Annotated[
    str | None,
    typer.Option(
        "--backbone-weights",
        help="none, timm (needs the model hub) or a local .safetensors/.pth file in timm or "
        "torchvision key layout (a .pth is read with torch's tensors-only loader).",
        show_default=False,
    ),
]
Stages = Annotated[
    str | None,
    typer.Option(
        "--stages",
        help="Backbone feature_info indices, e.g. 1,2,3,4 (default: last four).",
        show_default=False,
    ),
]
PatchSize = Annotated[int, typer.Option("--patch-size", help="Patch size in px.")]
InputSize = Annotated[int, typer.Option("--input-size", help="Model input size in px.")]
EmbedDim = Annotated[int, typer.Option("--embed-dim", help="Token dimension D.")]
ScaleDepth = Annotated[int, typer.Option("--scale-depth", help="Scale-attention blocks.")]
ScaleHeads = Annotated[int, typer.Option("--scale-heads", help="Scale-attention heads.")]
PatchDepth = Annotated[
    int, typer.Option("--patch-depth", help="Patch-attention (or hybrid) blocks.")
]
PatchHeads = Annotated[
    int, typer.Option("--patch-heads", help="Patch-attention (or hybrid) heads.")
]
ScaleToken = Annotated[str, typer.Option("--scale-token", help="learned, conv, first or mean.")]
PatchBlock = Annotated[str, typer.Option("--patch-block", help="faithful or prenorm.")]
BlockOrder = Annotated[str, typer.Option("--block-order", help="sequential or interleaved.")]
PatchAttention = Annotated[
    bool,
    typer.Option(
        "--patch-attention/--no-patch-attention", help="Patch attention (off: mean over patches)."
    ),
]
AcpLevels = Annotated[
    int, typer.Option("--acp-levels", help="Aggressive convolutional pooling levels (0 = off).")
]
CatConcepts = Annotated[
    int,
    typer.Option("--cat-concepts", help="Conceptual attention concepts (0 = off; 8 to start)."),
]
InteractionIn = Annotated[
    str, typer.Option("--interaction-in", help="Blocks that get ACP/CAT: scale, patch or both.")
]
DropPath = Annotated[float, typer.Option("--drop-path", help="Stochastic depth rate.")]
Dropout = Annotated[float, typer.Option("--dropout", help="Dropout rate.")]
FreezeBackbone = Annotated[
    bool,
    typer.Option(
        "--freeze-backbone/--no-freeze-backbone",
        help="Keep the CNN trunk fixed (a linear probe for --architecture resnet).",
    ),
]


def resolve_architecture(architecture: str, legacy: str | None) -> str:
    """``--architecture``, or a deprecated ``--model``/``--arch`` value (warned)."""
    if legacy is None:
        return architecture
    if legacy not in ARCHS:
        raise fail(
            f"--model {legacy!r}: on this command --model was the architecture, and now means a "
            f"checkpoint everywhere; give the architecture with --architecture ({', '.join(ARCHS)})"
        )
    from rich.console import Console

    Console(stderr=True).print(
        f"[yellow]warning:[/] --model/--arch {legacy} is deprecated here and will mean a "
        f"checkpoint in the next release; use --architecture {legacy}",
        highlight=False,
    )
    return legacy


def parse_stages(text: str | None) -> tuple[int, ...] | None:
    if text is None or text.strip().lower() in ("", "default"):
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise fail(f"--stages must be comma-separated integers like 1,2,3,4, got {text!r}") from err


def model_config_from_options(stages: str | None, **fields: Any) -> Any:
    """A ModelConfig from option values; invalid combinations exit with the reason."""
    from histoduo.models import ModelConfig

    try:
        return ModelConfig(stages=parse_stages(stages), **fields)
    except ValueError as err:
        raise fail(str(err)) from err
