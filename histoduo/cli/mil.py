"""``train-mil``: a slide-level model from slide labels and per-slide feature files."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._options import Device, Quiet, TrainQC
from histoduo.training.mil.config import MILConfig  # no torch: --help stays instant

# The defaults --help shows are the library's (MILConfig's field defaults).
MIL_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(MILConfig)}
FeaturesDir = Annotated[
    Path,
    typer.Argument(
        help="A features_<encoder> folder of <slide>.h5 feature files (written by embed).",
        show_default=False,
    ),
]
Labels = Annotated[
    Path,
    typer.Option(
        "--labels", help="CSV slide,label[,patient]: one label per slide.", show_default=False
    ),
]
RunOut = Annotated[Path, typer.Option("--out", "-o", help="Run folder.", show_default=False)]
Aggregator = Annotated[
    str,
    typer.Option(
        "--aggregator",
        help="abmil (gated attention MIL), transmil (transformer MIL) or mean (pooling baseline).",
    ),
]
MultiBranch = Annotated[
    bool,
    typer.Option("--multi-branch", help="abmil: one attention branch per class (CLAM-MB style)."),
]
Folds = Annotated[
    int,
    typer.Option(
        "--folds",
        help="K-fold cross-validation by patient (K >= 3; fold k tests, fold k+1 validates); "
        "1 = one split.",
    ),
]
Grades = Annotated[
    str | None,
    typer.Option(
        "--grades",
        help="Ordinal classes, low to high, comma-separated (e.g. ISUP_1,ISUP_2,ISUP_3,ISUP_4); "
        "labels outside it are an error.",
        show_default=False,
    ),
]
Epochs = Annotated[int, typer.Option("--epochs", help="Passes over the training slides.")]
LearningRate = Annotated[float, typer.Option("--lr", help="AdamW learning rate.")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
HiddenDim = Annotated[int, typer.Option("--hidden-dim", help="Width tiles are embedded to.")]
Dropout = Annotated[float, typer.Option("--dropout", help="Dropout after the tile embedding.")]
ValFraction = Annotated[float, typer.Option("--val-fraction", help="Share of patients.")]
TestFraction = Annotated[float, typer.Option("--test-fraction", help="Share of patients.")]
Patience = Annotated[
    int | None,
    typer.Option("--patience", help="Early stopping: epochs without a validation gain."),
]
MaxTrainTiles = Annotated[
    int | None,
    typer.Option(
        "--max-train-tiles",
        help="Train on a random subset of each bag of this many tiles (default: all).",
        show_default=False,
    ),
]
BagWorkers = Annotated[
    int, typer.Option("--workers", help="Processes reading bags ahead (0 = in-process).")
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", help="torch CPU threads (default: torch's).", show_default=False),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of splits, sampling and weights.")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")
]


@app.command("train-mil")
def train_mil_command(
    features_dir: FeaturesDir,
    labels: Labels,
    out: RunOut,
    aggregator: Aggregator = MIL_DEFAULTS["aggregator"],
    multi_branch: MultiBranch = MIL_DEFAULTS["multi_branch"],
    folds: Folds = MIL_DEFAULTS["folds"],
    grades: Grades = None,
    epochs: Epochs = MIL_DEFAULTS["epochs"],
    lr: LearningRate = MIL_DEFAULTS["lr"],
    weight_decay: WeightDecay = MIL_DEFAULTS["weight_decay"],
    hidden_dim: HiddenDim = MIL_DEFAULTS["hidden_dim"],
    dropout: Dropout = MIL_DEFAULTS["dropout"],
    val_fraction: ValFraction = MIL_DEFAULTS["val_fraction"],
    test_fraction: TestFraction = MIL_DEFAULTS["test_fraction"],
    patience: Patience = MIL_DEFAULTS["early_stopping_patience"],
    max_train_tiles: MaxTrainTiles = MIL_DEFAULTS["max_train_tiles"],
    workers: BagWorkers = MIL_DEFAULTS["num_workers"],
    threads: Threads = MIL_DEFAULTS["threads"],
    device: Device = MIL_DEFAULTS["device"],
    seed: Seed = MIL_DEFAULTS["seed"],
    qc: TrainQC = None,
    resume: Resume = False,
    quiet: Quiet = False,
) -> None:
    """Learn the slide's label from slide labels (attention MIL on tile features)."""
    from rich.console import Console

    from histoduo.runtime.errors import HistoduoError
    from histoduo.training.mil.loop import train_mil

    console = Console(stderr=True)
    try:
        config = MILConfig(
            features_dir=features_dir,
            labels_csv=labels,
            out_dir=out,
            aggregator=aggregator,
            multi_branch=multi_branch,
            folds=folds,
            grades=[g.strip() for g in grades.split(",") if g.strip()] if grades else None,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            hidden_dim=hidden_dim,
            dropout=dropout,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            early_stopping_patience=patience,
            max_train_tiles=max_train_tiles,
            num_workers=workers,
            threads=threads,
            device=device,
            seed=seed,
            qc=qc,
        )
        result = train_mil(
            config, resume=resume, progress=not quiet, log=None if quiet else console.print
        )
    except (HistoduoError, ValueError) as exc:
        raise fail(str(exc)) from None
    for split in ("val", "test"):
        block = result.report.get(split)
        if block:
            spread = block.get("std", {})
            text = ", ".join(
                f"{m} {block[m]:.3f}" + (f" +/- {spread[m]:.3f}" if m in spread else "")
                for m in ("balanced_accuracy", "macro_f1", "auc", "qwk")
            )
            console.print(f"{split}: {text}")
    console.print(f"[green]run folder:[/] {result.run_dir}")
