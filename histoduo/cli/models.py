"""``histoduo model-info``: parameters, FLOPs, tokens and memory of a model configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._model_options import (
    MODEL_DEFAULTS,
    AcpLevels,
    Architecture,
    Backbone,
    BlockOrder,
    CatConcepts,
    EmbedDim,
    FreezeBackbone,
    InputSize,
    InteractionIn,
    LegacyArch,
    PatchAttention,
    PatchBlock,
    PatchDepth,
    PatchHeads,
    PatchSize,
    ScaleDepth,
    ScaleHeads,
    ScaleToken,
    Stages,
    model_config_from_options,
    resolve_architecture,
)
from histoduo.cli._options import TrustCheckpoint


@app.command("model-info")
def model_info_command(
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="histoduo checkpoint whose model to describe (overrides the flags).",
            show_default=False,
        ),
    ] = None,
    legacy_checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", hidden=True, help="Deprecated: use --model."),
    ] = None,
    architecture: Architecture = MODEL_DEFAULTS.arch,
    legacy_arch: LegacyArch = None,
    backbone: Backbone = MODEL_DEFAULTS.backbone,
    stages: Stages = None,
    patch_size: PatchSize = MODEL_DEFAULTS.patch_size_px,
    input_size: InputSize = MODEL_DEFAULTS.input_size_px,
    embed_dim: EmbedDim = MODEL_DEFAULTS.embed_dim,
    scale_depth: ScaleDepth = MODEL_DEFAULTS.scale_depth,
    scale_heads: ScaleHeads = MODEL_DEFAULTS.scale_heads,
    patch_depth: PatchDepth = MODEL_DEFAULTS.patch_depth,
    patch_heads: PatchHeads = MODEL_DEFAULTS.patch_heads,
    scale_token: ScaleToken = MODEL_DEFAULTS.scale_token,
    patch_block: PatchBlock = MODEL_DEFAULTS.patch_block,
    block_order: BlockOrder = MODEL_DEFAULTS.block_order,
    patch_attention: PatchAttention = MODEL_DEFAULTS.patch_attention,
    acp_levels: AcpLevels = MODEL_DEFAULTS.acp_levels,
    cat_concepts: CatConcepts = MODEL_DEFAULTS.cat_concepts,
    interaction_in: InteractionIn = MODEL_DEFAULTS.interaction_in,
    num_classes: Annotated[int, typer.Option(help="Output classes.")] = MODEL_DEFAULTS.num_classes,
    freeze_backbone: FreezeBackbone = MODEL_DEFAULTS.freeze_backbone,
    batch_size: Annotated[int, typer.Option(help="Batch for the memory measurement.")] = 1,
    device: Annotated[str, typer.Option(help="Device for the memory measurement.")] = "cpu",
    memory: Annotated[
        bool, typer.Option(help="Measure activation memory (runs a forward).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    trust_checkpoint: TrustCheckpoint = False,
) -> None:
    """Parameters, GFLOPs per tile, tokens per stage and activation memory of a model."""

    from histoduo.models import ModelConfig
    from histoduo.models.checkpoint import CheckpointError, load_checkpoint
    from histoduo.models.info import model_info

    if legacy_checkpoint is not None:
        from rich.console import Console

        Console(stderr=True).print(
            "[yellow]warning:[/] --checkpoint is deprecated; use --model", highlight=False
        )
        model = model or legacy_checkpoint
    if model is not None:
        try:
            payload = load_checkpoint(model, trust=trust_checkpoint)
            config = ModelConfig.from_dict(payload["meta"]["model_config"])
        except (CheckpointError, TypeError, ValueError) as err:
            raise fail(str(err)) from err
    else:
        config = model_config_from_options(
            stages,
            arch=resolve_architecture(architecture, legacy_arch),
            backbone=backbone,
            patch_size_px=patch_size,
            input_size_px=input_size,
            embed_dim=embed_dim,
            scale_depth=scale_depth,
            scale_heads=scale_heads,
            patch_depth=patch_depth,
            patch_heads=patch_heads,
            scale_token=scale_token,
            patch_block=patch_block,
            block_order=block_order,
            patch_attention=patch_attention,
            acp_levels=acp_levels,
            cat_concepts=cat_concepts,
            interaction_in=interaction_in,
            num_classes=num_classes,
            freeze_backbone=freeze_backbone,
        )
    try:
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


@app.command("convert-checkpoint")
def convert_checkpoint_command(
    source: Annotated[Path, typer.Argument(help="A pickled histoduo 0.1 checkpoint (.pt).")],
    target: Annotated[Path, typer.Argument(help="Where to write the safe checkpoint.")],
    trust_checkpoint: TrustCheckpoint = False,
) -> None:
    """Resave an old pickled checkpoint in the safe format (safetensors + JSON).

    Reading the old file unpickles it, which can run code: --trust-checkpoint is required.
    """
    from histoduo.models.checkpoint import TRUST_FLAG, CheckpointError, convert_checkpoint

    if not trust_checkpoint:
        raise fail(
            f"{source}: converting unpickles the file, which can run any code in it; pass "
            f"{TRUST_FLAG} if you trust where it comes from"
        )
    if target.resolve() == source.resolve():
        raise fail(f"{target}: write the converted checkpoint to a new file")
    try:
        written = convert_checkpoint(source, target)
    except CheckpointError as err:
        raise fail(str(err)) from err
    typer.echo(f"wrote {written}")
