"""Rich progress bars (or nothing), kept out of the stage logic: slides, and training epochs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SlideProgress:
    """One bar over slides and one over the current slide's tiles; inert when disabled."""

    enabled: bool
    total_slides: int
    _progress: Any = None
    _overall: Any = None
    _slide: Any = None

    def __enter__(self) -> SlideProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.__enter__()
            self._overall = self._progress.add_task("slides", total=self.total_slides, rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_slide(self, name: str, n_tiles: int) -> None:
        if self._progress is not None:
            if self._slide is not None:
                self._progress.remove_task(self._slide)
            self._slide = self._progress.add_task(name[:40], total=max(n_tiles, 1), rate="")

    def advance_tiles(self, n: int, rate: float) -> None:
        if self._progress is not None and self._slide is not None:
            self._progress.update(self._slide, advance=n, rate=f"{rate:,.0f} tiles/s")

    def slide_done(self) -> None:
        if self._progress is not None:
            self._progress.update(self._overall, advance=1)


class EpochProgress:
    """A rich progress bar per epoch with loss, lr and throughput (or nothing)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> EpochProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[rate]}"),
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, description: str, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(
                description, total=total, loss="-", lr="-", rate=""
            )

    def advance(self, loss: float, lr: float, rate: float) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                advance=1,
                loss=f"{loss:.4f}",
                lr=f"{lr:.2e}",
                rate=f"{rate:.0f} tiles/s",
            )
