"""``histoduo demo``: from nothing to a graded heatmap, offline, in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._options import Device, Quiet


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every demo output.")] = Path(
        "histoduo-demo"
    ),
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.")] = 5,
    iterations: Annotated[
        int, typer.Option("--iterations", help="Training iterations per epoch.")
    ] = 30,
    slides: Annotated[int, typer.Option("--slides", help="Synthetic training slides.")] = 4,
    slide_size: Annotated[
        int, typer.Option("--slide-size", help="Width of each synthetic slide in level-0 px.")
    ] = 4096,
    device: Device = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed for slides, splits and model.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Make synthetic slides, tile them, train a small DuoFormer and grade a held-out slide."""
    from rich.console import Console
    from rich.table import Table

    from histoduo.synthetic.demo import DemoConfig, run_demo

    console = Console(stderr=True)
    try:
        summary = run_demo(
            out,
            DemoConfig(
                n_train_slides=slides,
                slide_width_px=slide_size,
                slide_height_px=slide_size * 3 // 4,
                epochs=epochs,
                iterations_per_epoch=iterations,
                device=device,
                seed=seed,
            ),
            progress=not quiet,
            log=lambda message: console.print(f"[bold]{message}[/]"),
        )
    except (ValueError, OSError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    verdict = "[green]right[/]" if summary.slide_call == summary.slide_truth else "[red]wrong[/]"
    console.print(
        f"\nheld-out slide: {summary.held_out_tiles} tiles, balanced accuracy "
        f"{summary.held_out_balanced_accuracy:.3f}; slide-level call [bold]{summary.slide_call}"
        f"[/] (truth {summary.slide_truth}: {verdict}); {summary.seconds:.0f} s"
    )
    table = Table("output", "path", title="where everything is")
    for name, path in summary.outputs.items():
        table.add_row(name, path)
    console.print(table)
