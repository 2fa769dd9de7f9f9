"""Option types shared by several commands, so each flag means the same everywhere."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from histoduo.runtime.locks import LockParams

LOCK_DEFAULTS = LockParams()

SlideInputs = Annotated[
    list[str],
    typer.Argument(
        help="Slide files, folders (searched recursively), glob patterns, or a slide CSV "
        "(columns: path[,mpp]).",
        show_default=False,
    ),
]
Backend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="Slide reader: auto (tiffslide for JPEG SVS, OpenSlide otherwise), openslide, "
        "tiffslide.",
    ),
]
SlideMpp = Annotated[
    float | None,
    typer.Option(
        "--slide-mpp",
        help="Override the slides' own level-0 resolution (um/px), e.g. for files without it.",
        show_default=False,
    ),
]
TargetMpp = Annotated[
    float | None,
    typer.Option(
        "--mpp",
        help="Target resolution of the tiles in um/px (default 0.5 = 20x).",
        show_default=False,
    ),
]
TargetMag = Annotated[
    float | None,
    typer.Option(
        "--mag",
        help="Target magnification instead of --mpp (mpp = 10 / mag).",
        show_default=False,
    ),
]
SkipErrors = Annotated[
    bool,
    typer.Option(
        "--skip-errors",
        help="Record failing slides (any error) in the report and go on with the rest; "
        "exit with status 3 when any failed.",
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Redo finished work instead of skipping it.")
]
Shard = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="Process only shard K of N (e.g. 2/8), a stable subset by slide name (a store's "
        "names with --tiles), so N independent jobs share a cohort. 'auto' takes K and N "
        "from a SLURM array task (--array=1-N); 'auto/N' takes K from the array index "
        "(rerun one task with --array=K). '{shard}' in --out becomes K-of-N.",
        show_default=False,
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Worker processes (default: CPU count; 0 = in-process).",
        show_default=False,
        min=0,
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
WaitLock = Annotated[
    float,
    typer.Option(
        "--wait-lock",
        min=0,
        help="Seconds to wait when another run holds the output's writer lock (default: "
        "fail at once, naming that run).",
    ),
]
ClearDeadLocks = Annotated[
    bool,
    typer.Option(
        "--clear-dead-locks",
        help="Clear a writer lock left by a run that died on another host (a lock of an "
        "ended process on this host is cleared without it; a live one never is).",
    ),
]


def lock_params(wait_lock: float, clear_dead_locks: bool) -> LockParams:
    try:
        return LockParams(wait_s=wait_lock, clear_dead=clear_dead_locks)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
OutFile = Annotated[Path, typer.Option("--out", "-o", help="Output file.")]
MinTissue = Annotated[
    float, typer.Option("--min-tissue", help="Minimum tissue fraction of a tile (0-1).")
]
QCMode = Annotated[
    str,
    typer.Option(
        "--qc",
        help="Artefact QC (pen ink, blur, folds; docs/qc.md): exclude = flagged tiles are "
        "kept and reported but left out of training, the grade and MIL; flag = reported "
        "only; off = not checked.",
    ),
]
TrainQC = Annotated[
    str | None,
    typer.Option(
        "--qc",
        help="Tiles QC flagged as artefacts: exclude (leave them out of training) or flag "
        "(train on them); default: as each slide was tiled (tile --qc).",
        show_default=False,
    ),
]
TrustCheckpoint = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Also load pickled (torch.save) checkpoints and weight files, the format of "
        "histoduo 0.1. A pickle can run any code on load: only for files you trust.",
    ),
]


def mpp_from_options(mpp: float | None, magnification: float | None) -> tuple[float, float | None]:
    """The target mpp from --mpp or --mag (10x ~ 1.0 um/px); default 0.5 (20x)."""
    if mpp is not None and magnification is not None:
        raise ValueError("give --mpp or --mag, not both")
    if magnification is not None:
        if magnification <= 0:
            raise ValueError(f"--mag must be positive, got {magnification}")
        return 10.0 / magnification, magnification
    if mpp is not None:
        if not mpp > 0 or not math.isfinite(mpp):
            raise ValueError(f"--mpp must be positive, got {mpp}")
        return mpp, None
    return 0.5, None
