"""``histoduo model-info``: parameters, FLOPs, tokens and memory of a model configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from histoduo.cli._app import app, fail


def _parse_stages(text: str | None) -> tuple[int, ...] | None:
    if text is None or text.strip().lower() in ("", "default"):
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise fail(f"--stages must be comma-separated integers like 1,2,3,4, got {text!r}") from err


@app.command("model-info")
def model_info_command(
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint whose 'model_config' to describe (overrides the flags)."),
    ] = None,
    arch: Annotated[str, typer.Option(help="duoformer, resnet or hybrid.")] = "duoformer",
    backbone: Annotated[str, typer.Option(help="timm CNN name.")] = "resnet50",
    stages: Annotated[
        str | None,
        typer.Option(help="Backbone feature_info indices, e.g. 1,2,3,4 (default: last four)."),
    ] = None,
    patch_size: Annotated[int, typer.Option(help="Patch size in px.")] = 32,
    input_size: Annotated[int, typer.Option(help="Tile size in px.")] = 224,
    embed_dim: Annotated[int, typer.Option(help="Token dimension D.")] = 768,
    scale_depth: Annotated[int, typer.Option(help="Scale-attention blocks.")] = 8,
    scale_heads: Annotated[int, typer.Option(help="Scale-attention heads.")] = 8,
    patch_depth: Annotated[int, typer.Option(help="Patch-attention (or hybrid) blocks.")] = 8,
    patch_heads: Annotated[int, typer.Option(help="Patch-attention (or hybrid) heads.")] = 8,
    scale_token: Annotated[str, typer.Option(help="learned, conv, first or mean.")] = "learned",
    patch_block: Annotated[str, typer.Option(help="faithful or prenorm.")] = "faithful",
    block_order: Annotated[str, typer.Option(help="sequential or interleaved.")] = "sequential",
    patch_attention: Annotated[
        bool, typer.Option(help="Patch attention (off: mean over patches).")
    ] = True,
    acp_levels: Annotated[
        int, typer.Option(help="Aggressive convolutional pooling levels (0 = off).")
    ] = 0,
    cat_concepts: Annotated[
        int, typer.Option(help="Conceptual attention concepts (0 = off; 8 is a good start).")
    ] = 0,
    interaction_in: Annotated[
        str, typer.Option(help="Blocks that get ACP/CAT: scale, patch or both.")
    ] = "both",
    num_classes: Annotated[int, typer.Option(help="Output classes.")] = 3,
    freeze_backbone: Annotated[bool, typer.Option(help="Count the backbone as frozen.")] = False,
    batch_size: Annotated[int, typer.Option(help="Batch for the memory measurement.")] = 1,
    device: Annotated[str, typer.Option(help="Device for the memory measurement.")] = "cpu",
    memory: Annotated[
        bool, typer.Option(help="Measure activation memory (runs a forward).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Parameters, GFLOPs per tile, tokens per stage and activation memory of a model."""
    import torch

    from histoduo.models import ModelConfig
    from histoduo.models.info import model_info

    try:
        if checkpoint is not None:
            if not checkpoint.is_file():
                raise fail(f"checkpoint not found: {checkpoint}")
            data = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or "model_config" not in data:
                raise fail(f"{checkpoint} has no 'model_config' entry")
            config = ModelConfig.from_dict(data["model_config"])
        else:
            config = ModelConfig(
                arch=arch,  # type: ignore[arg-type]
                backbone=backbone,
                stages=_parse_stages(stages),
                patch_size_px=patch_size,
                input_size_px=input_size,
                embed_dim=embed_dim,
                scale_depth=scale_depth,
                scale_heads=scale_heads,
                patch_depth=patch_depth,
                patch_heads=patch_heads,
                scale_token=scale_token,  # type: ignore[arg-type]
                patch_block=patch_block,  # type: ignore[arg-type]
                block_order=block_order,  # type: ignore[arg-type]
                patch_attention=patch_attention,
                acp_levels=acp_levels,
                cat_concepts=cat_concepts,
                interaction_in=interaction_in,  # type: ignore[arg-type]
                num_classes=num_classes,
                freeze_backbone=freeze_backbone,
            )
        info = model_info(config, batch_size=batch_size, device=device, measure_memory=memory)
    except (ValueError, RuntimeError) as err:
        raise fail(str(err)) from err

    if as_json:
        typer.echo(json.dumps({"config": config.to_dict(), "info": info.to_dict()}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.arch} / {config.backbone} @ {config.input_size_px} px")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("parameters (total)", f"{info.params_total / 1e6:.2f} M")
    table.add_row("parameters (trainable)", f"{info.params_trainable / 1e6:.2f} M")
    table.add_row("GFLOPs / tile (2 x MACs)", f"{info.gflops_per_tile:.1f}")
    if info.params_interaction:
        table.add_row(
            f"interaction (ACP {config.acp_levels} / CAT {config.cat_concepts}, "
            f"{config.interaction_in})",
            f"{info.params_interaction / 1e6:.3f} M params, {info.gflops_interaction:.3f} GFLOPs",
        )
    if info.num_patches is not None:
        table.add_row("patches N", str(info.num_patches))
    if info.tokens_per_patch is not None:
        table.add_row("tokens per patch (S+1)", str(info.tokens_per_patch))
    for stage, count in info.tokens_per_stage.items():
        table.add_row(f"tokens from stage {stage}", str(count))
    if info.activation_bytes is not None:
        table.add_row(
            f"activation memory, batch {info.batch_size} on {info.device}",
            f"{info.activation_bytes / 2**20:.1f} MiB",
        )
        table.add_row("memory measured as", info.activation_method)
    Console().print(table)
