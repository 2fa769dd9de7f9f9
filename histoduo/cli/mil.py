"""``train-mil``: a slide-level model from slide labels and per-slide feature files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoduo.cli._app import app, fail
from histoduo.cli._options import Quiet

# Defaults mirror histoduo.training.mil.MILConfig (tests/test_mil.py checks they agree); the
# config is not imported here because histoduo.training imports torch (--help stays instant).
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
MilDevice = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of splits, sampling and weights.")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")
]


@app.command("train-mil")
def train_mil_command(
    features_dir: FeaturesDir,
    labels: Labels,
    out: RunOut,
    aggregator: Aggregator = "abmil",
    multi_branch: MultiBranch = False,
    folds: Folds = 1,
    grades: Grades = None,
    epochs: Epochs = 20,
    lr: LearningRate = 2e-4,
    weight_decay: WeightDecay = 1e-5,
    hidden_dim: HiddenDim = 256,
    dropout: Dropout = 0.25,
    val_fraction: ValFraction = 0.2,
    test_fraction: TestFraction = 0.2,
    patience: Patience = 5,
    max_train_tiles: MaxTrainTiles = None,
    workers: BagWorkers = 1,
    threads: Threads = None,
    device: MilDevice = "auto",
    seed: Seed = 0,
    resume: Resume = False,
    quiet: Quiet = False,
) -> None:
    """Learn the slide's label from slide labels (attention MIL on tile features)."""
    from rich.console import Console

    from histoduo.runtime.errors import HistoduoError
    from histoduo.training.mil import MILConfig, train_mil

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
