"""Training commands: ``train`` and ``evaluate``."""

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
    BackboneWeights,
    BlockOrder,
    CatConcepts,
    Dropout,
    DropPath,
    EmbedDim,
    FreezeBackbone,
    InteractionIn,
    LegacyArchitecture,
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
from histoduo.cli._options import Quiet, TrustCheckpoint
from histoduo.training.config import TrainConfig

TRAIN_DEFAULTS = TrainConfig()  # the defaults --help shows are the library's

Store = Annotated[Path, typer.Argument(help="Tile store with labelled tiles.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
SlideLabels = Annotated[
    Path | None,
    typer.Option(
        "--slide-labels",
        help="CSV slide,label[,patient]: every tile of a slide gets the slide's label.",
        show_default=False,
    ),
]
LabelSmoothing = Annotated[float, typer.Option("--label-smoothing")]
GradAccumulation = Annotated[int, typer.Option("--grad-accumulation")]
Bf16 = Annotated[str, typer.Option("--bf16", help="auto (GPU only), on or off.")]
Splits = Annotated[
    Path | None,
    typer.Option("--splits", help="CSV slide,split (train/val/test) to use.", show_default=False),
]


def _names(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _display_names(items: list[str]) -> dict[str, str]:
    """CLASS=NAME items -> {class: name}."""
    names = {}
    for item in items:
        cls, sep, name = item.partition("=")
        if not sep or not cls.strip() or not name.strip():
            raise fail(f'--display-name must look like CLASS="Display name", got {item!r}')
        names[cls.strip()] = name.strip()
    return names


@app.command("train")
def train_command(
    store: Store,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")],
    architecture: Architecture = MODEL_DEFAULTS.arch,
    legacy_architecture: LegacyArchitecture = None,
    backbone: Backbone = MODEL_DEFAULTS.backbone,
    backbone_weights: BackboneWeights = MODEL_DEFAULTS.backbone_weights,
    freeze_backbone: FreezeBackbone = MODEL_DEFAULTS.freeze_backbone,
    stages: Stages = None,
    patch_size: PatchSize = MODEL_DEFAULTS.patch_size_px,
    input_size: Annotated[
        int | None,
        typer.Option(
            "--input-size", help="Model input in px (default: the tile size).", show_default=False
        ),
    ] = None,
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
    dropout: Dropout = MODEL_DEFAULTS.dropout,
    drop_path: DropPath = MODEL_DEFAULTS.drop_path,
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="default, or authors (the DuoFormer authors' recipe, docs/training.md).",
        ),
    ] = TRAIN_DEFAULTS.preset,
    epochs: Annotated[
        int | None, typer.Option("--epochs", show_default=False, help="Epochs (default 10).")
    ] = None,
    iterations: Annotated[
        int | None,
        typer.Option(
            "--iterations", help="Iterations per epoch (default: one pass).", show_default=False
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", show_default=False, help="Tiles per step (default 32)."),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", show_default=False, help="Peak learning rate (default 1e-4)."),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option("--weight-decay", show_default=False, help="Weight decay (default 1e-4)."),
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option("--optimizer", show_default=False, help="adam or adamw.")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler", show_default=False, help="onecycle, cosine or none (per iteration)."
        ),
    ] = None,
    label_smoothing: Annotated[
        float, typer.Option("--label-smoothing")
    ] = TRAIN_DEFAULTS.label_smoothing,
    weighted_loss: Annotated[
        bool,
        typer.Option(
            "--weighted-loss",
            help="Inverse-frequency class weights instead of class-balanced batches.",
        ),
    ] = False,
    hed: Annotated[
        float, typer.Option("--hed", help="HED stain augmentation strength (0 = off, ~0.03).")
    ] = TRAIN_DEFAULTS.augment.hed_sigma,
    val_fraction: Annotated[float, typer.Option("--val-fraction")] = TRAIN_DEFAULTS.val_fraction,
    test_fraction: Annotated[float, typer.Option("--test-fraction")] = TRAIN_DEFAULTS.test_fraction,
    split_by: Annotated[str, typer.Option("--split-by", help="slide or patient.")] = (
        TRAIN_DEFAULTS.split_by
    ),
    splits: Splits = None,
    slide_labels: SlideLabels = None,
    grades: Annotated[
        str | None,
        typer.Option(
            "--grades",
            help="Tumour grade classes, low to high, e.g. "
            "low_grade,high_grade (default: inferred from class names).",
            show_default=False,
        ),
    ] = None,
    display_name: Annotated[
        list[str] | None,
        typer.Option(
            "--display-name",
            help='Name people read for a class, CLASS="ISUP grade 3-4" (repeatable; default '
            'from the class id: high_grade -> "High grade").',
            show_default=False,
        ),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            "--patience", help="Early stopping: epochs without validation gain.", show_default=False
        ),
    ] = None,
    grad_accumulation: Annotated[
        int, typer.Option("--grad-accumulation")
    ] = TRAIN_DEFAULTS.grad_accumulation,
    bf16: Annotated[
        str, typer.Option("--bf16", help="auto (GPU only), on or off.")
    ] = TRAIN_DEFAULTS.bf16,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = (
        False
    ),
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="DataLoader workers (default: min(4, cores - 1)).", show_default=False
        ),
    ] = None,
    device: Device = "auto",
    seed: Annotated[int, typer.Option("--seed")] = TRAIN_DEFAULTS.seed,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    trust_checkpoint: TrustCheckpoint = False,
    quiet: Quiet = False,
) -> None:
    """Train DuoFormer (or a baseline) on the labelled tiles of a store, splitting by slide."""
    from rich.console import Console

    from histoduo.models.checkpoint import CheckpointError
    from histoduo.store import StoreError
    from histoduo.training import LabelError, TrainConfig, train
    from histoduo.training.data import store_tile_size_px

    console = Console(stderr=True)
    arch = resolve_architecture(architecture, legacy_architecture)
    shown_names = _display_names(display_name or [])  # before any work: a typo fails fast
    if not store.exists():
        raise fail(f"{store}: tile store not found")
    try:
        tile_size = input_size or store_tile_size_px(store)
    except (StoreError, OSError, KeyError) as exc:
        raise fail(f"{store}: not a usable tile store ({exc})") from None
    model_config = model_config_from_options(
        stages, arch=arch, backbone=backbone, backbone_weights=backbone_weights,
        freeze_backbone=freeze_backbone, patch_size_px=patch_size, input_size_px=tile_size,
        embed_dim=embed_dim, scale_depth=scale_depth, scale_heads=scale_heads,
        patch_depth=patch_depth, patch_heads=patch_heads, scale_token=scale_token,
        patch_block=patch_block, block_order=block_order, patch_attention=patch_attention,
        acp_levels=acp_levels, cat_concepts=cat_concepts, interaction_in=interaction_in,
        dropout=dropout, drop_path=drop_path,
    )  # fmt: skip
    # Options left unset take the preset's value (the authors' recipe differs from ours).
    given = {
        "epochs": epochs, "iterations_per_epoch": iterations, "batch_size": batch_size,
        "lr": lr, "weight_decay": weight_decay, "optimizer": optimizer, "scheduler": scheduler,
    }  # fmt: skip
    settings = {k: v for k, v in given.items() if v is not None}
    settings.update(
        label_smoothing=label_smoothing, weighted_loss=weighted_loss, val_fraction=val_fraction,
        test_fraction=test_fraction, split_by=split_by,
        splits_csv=str(splits) if splits else None,
        slide_labels_csv=str(slide_labels) if slide_labels else None, grades=_names(grades),
        class_display_names=shown_names,
        early_stopping_patience=patience, grad_accumulation=grad_accumulation, bf16=bf16,
        compile=compile_model, num_workers=workers, device=device, seed=seed,
    )  # fmt: skip
    try:
        config = TrainConfig.from_preset(preset, hed_sigma=hed, **settings)
        result = train(
            store,
            out,
            config,
            model_config=model_config,
            resume=resume,
            progress=not quiet,
            log=console.print,
            trust_checkpoint=trust_checkpoint,
        )
    except (LabelError, StoreError, CheckpointError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    if not result.main_process:
        return  # under torchrun only rank 0 reports
    summary = {k: result.metrics.get(f"{k}_balanced_accuracy") for k in ("val", "test")}
    shown = ", ".join(f"{k} balanced accuracy {v:.3f}" for k, v in summary.items() if v is not None)
    console.print(
        f"[green]done[/]: {shown or 'no validation or test slides'}; best checkpoint "
        f"{result.best_checkpoint}; report {result.run_dir / 'report.json'}"
    )


@app.command("evaluate")
def evaluate_command(
    store: Store,
    model: Annotated[Path, typer.Option("--model", "-m", help="histoduo checkpoint.")],
    split: Annotated[
        str, typer.Option("--split", help="all, train, val or test (needs the run's splits).")
    ] = "all",
    splits: Splits = None,
    slide_labels: SlideLabels = None,
    device: Device = "auto",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the report JSON here.", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    trust_checkpoint: TrustCheckpoint = False,
) -> None:
    """Balanced accuracy, per-class recall/precision/F1 and confusion matrix on a store."""
    from histoduo.models.checkpoint import CheckpointError
    from histoduo.store import StoreError
    from histoduo.training import LabelError, evaluate

    if split not in ("all", "train", "val", "test"):
        raise fail(f"--split must be all, train, val or test, got {split!r}")
    try:
        report = evaluate(
            store,
            model,
            split,
            splits,
            slide_labels_csv=slide_labels,
            device=device,
            trust_checkpoint=trust_checkpoint,
        )
    except (LabelError, StoreError, CheckpointError, ValueError) as exc:
        raise fail(str(exc)) from None
    if out is not None:
        from histoduo.runtime.files import atomic_write_text

        atomic_write_text(out, json.dumps(report, indent=2))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{store} ({split}): {report['n_tiles']} tiles, balanced accuracy "
        f"{report['balanced_accuracy']:.3f}"
    )
    for column in ("class", "recall", "precision", "F1", "tiles"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in report["per_class"].items():
        table.add_row(
            name,
            f"{row['recall']:.3f}",
            f"{row['precision']:.3f}",
            f"{row['f1']:.3f}",
            str(row["support"]),
        )
    Console().print(table)
