"""Foundation-model encoders: ``encoders`` (the registry) and ``embed`` (features per tile)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._options import Device, JsonOutput, Overwrite, Quiet, SkipErrors

EncoderName = Annotated[
    str,
    typer.Option(
        "--encoder",
        help="Registry name (histoduo encoders), timm:<model>, or a histoduo checkpoint.",
        show_default=False,
    ),
]
EncoderWeightsPath = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        help="Local weights: .safetensors, .bin/.pth (tensors only) or a downloaded model "
        "folder. Never downloaded. Not for checkpoint encoders.",
        show_default=False,
    ),
]


@app.command("encoders")
def encoders_command(as_json: JsonOutput = False) -> None:
    """The foundation-model encoders histoduo knows: architecture, size, input, licence."""
    from histoduo.models.encoders import registered_encoders, summarize_encoders

    rows = summarize_encoders(list(registered_encoders()))
    if as_json:
        typer.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="encoders: weights are your own local files (docs/encoders.md)")
    table.add_column("name")
    table.add_column("timm model")
    table.add_column("dim", justify="right")
    table.add_column("pooling")
    table.add_column("params", justify="right")
    table.add_column("licence")
    table.add_column("weights from")
    for row in rows:
        spec = row.spec
        table.add_row(
            spec.name,
            spec.timm_name,
            str(spec.embedding_dim),
            "cls+mean" if spec.pooling == "cls_mean" else "cls",
            f"{row.params / 1e6:,.1f}M",
            spec.licence,
            spec.source.removeprefix("https://huggingface.co/"),
        )
    Console().print(table)
    typer.echo(
        "All: 224 px tiles at 0.5 um/px; gated downloads. Also: timm:<model> and a histoduo "
        "checkpoint path. Details: histoduo encoders --json"
    )


@app.command("embed")
def embed_command(
    store: Annotated[Path, typer.Argument(help="Tile store to embed.", show_default=False)],
    encoder: EncoderName,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Writes OUT/features_<encoder>/<slide>.h5.")
    ],
    weights: EncoderWeightsPath = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Tiles per batch (256 GPU, 64 CPU).", show_default=False),
    ] = None,
    device: Device = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16.")
    ] = "auto",
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="DataLoader workers (default: as predict).", show_default=False
        ),
    ] = None,
    overwrite: Overwrite = False,
    skip_errors: SkipErrors = False,
    quiet: Quiet = False,
) -> None:
    """Features of every tile of every slide, in TRIDENT's layout, from local weights."""
    from histoduo.predict.embed import EmbedParams, embed_store
    from histoduo.runtime.errors import HistoduoError

    try:
        params = EmbedParams(
            encoder=encoder,
            weights=str(weights) if weights is not None else None,
            batch_size=batch_size,
            device=device,
            precision=precision,
            workers=workers,
            overwrite=overwrite,
            skip_errors=skip_errors,
            quiet=quiet,
        )
        result = embed_store(store, out, params)
    except (HistoduoError, ValueError) as err:
        raise fail(str(err)) from err
    from rich.console import Console

    console = Console(stderr=True)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    counts: dict[str, int] = {}
    for status in result.status.values():
        key = status.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    typer.echo(
        f"{result.features_dir}: {summary}; {result.tiles} tiles at {result.tiles_per_s:,.1f} "
        f"tiles/s (weights sha256 {result.weights_sha256[:16] or '-'})"
    )
    if counts.get("error"):
        raise typer.Exit(1)
