"""A results folder's safety rules for ``predict``: which model made what is there, one writer
at a time, and new results installed before old ones go.

- Every slide's ``summary.json`` records the checkpoint's path and SHA-256; a run refuses an
  ``--out`` whose finished slides another checkpoint made (``--overwrite`` redoes them).
- A slide is written into a hidden staging folder beside its folder and moved in file by file
  once complete, the ``done`` marker last; only files ``predict`` writes are replaced or
  removed, so a failure leaves the previous result whole and a user's own files stay.
- The manifest lists the slide folders actually there (rebuilt from them), not one run's.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histoduo.results.layout import (
    DONE_MARKER,
    ERROR_FILE,
    ResultsConflictError,
    SlideSummary,
    is_done,
    is_result_file,
)
from histoduo.runtime.files import file_sha256, temporary_path
from histoduo.runtime.locks import LockParams, WriterLock, folder_lock_path


@dataclass(frozen=True, kw_only=True)
class CheckpointIdentity:
    """Which model made a result: the checkpoint's absolute path and content hash."""

    path: str
    sha256: str

    @classmethod
    def of(cls, checkpoint: str | Path | None) -> CheckpointIdentity:
        """The identity of a checkpoint file ("" fields for a model handed in memory)."""
        if not checkpoint or not Path(checkpoint).is_file():
            return cls(path=str(checkpoint or ""), sha256="")
        return cls(path=str(Path(checkpoint).resolve()), sha256=file_sha256(checkpoint))

    def made(self, summary: SlideSummary) -> bool:
        """Whether ``summary`` was predicted by this checkpoint.

        Summaries written before the hash was recorded are matched by the checkpoint path
        they name (resolved); a model handed in memory matches anything (nothing to compare).
        """
        if not self.sha256:
            return True
        if summary.checkpoint_sha256:
            return summary.checkpoint_sha256 == self.sha256
        return bool(summary.checkpoint) and _same_path(summary.checkpoint, self.path)


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_same_model(out: Path, names: Sequence[str], model: CheckpointIdentity) -> list[str]:
    """The finished slides among ``names`` in ``out`` that another checkpoint made."""
    other = []
    for name in names:
        folder = out / name
        if not is_done(folder):
            continue
        try:
            summary = SlideSummary.read(folder)
        except (OSError, ValueError):
            other.append(name)  # a done folder without a readable summary: not ours to trust
            continue
        if not model.made(summary):
            other.append(name)
    return other


def conflict_error(out: Path, other: list[str], model: CheckpointIdentity) -> ResultsConflictError:
    try:
        summary = SlideSummary.read(out / other[0])
        theirs = f"{summary.checkpoint or 'an unnamed checkpoint'}"
        if summary.checkpoint_sha256:
            theirs += f" (sha256 {summary.checkpoint_sha256[:12]})"
    except (OSError, ValueError):
        theirs = "an unknown checkpoint (its summary.json is unreadable)"
    shown = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
    return ResultsConflictError(
        out,
        f"{len(other)} finished slide(s) here ({shown}) were predicted with {theirs}, not "
        f"{model.path} (sha256 {model.sha256[:12]}); predict into another --out, or pass "
        "--overwrite to redo those slides with this checkpoint (each result is replaced "
        "only once the new one is complete)",
    )


def staging_folder(slide_dir: Path) -> Path:
    """Where a slide's new results are written before they replace the old ones."""
    return temporary_path(slide_dir)


def install_results(staging: Path, slide_dir: Path) -> None:
    """Move a complete staged result into ``slide_dir``: new files first, then stale result
    files of an earlier run removed, the ``done`` marker last. Files predict does not write
    stay. A kill part-way leaves a folder without ``done`` (redone by the next run)."""
    slide_dir.mkdir(parents=True, exist_ok=True)
    (slide_dir / DONE_MARKER).unlink(missing_ok=True)  # from here on: unfinished
    new = {p.name for p in staging.iterdir()}
    for name in sorted(new - {DONE_MARKER}):
        os.replace(staging / name, slide_dir / name)
    for path in slide_dir.iterdir():
        if path.is_file() and is_result_file(path.name) and path.name not in new:
            path.unlink()  # e.g. prob_<class>.png of another model, an old error.json
    if DONE_MARKER in new:
        os.replace(staging / DONE_MARKER, slide_dir / DONE_MARKER)
    shutil.rmtree(staging, ignore_errors=True)


def record_failure(slide_dir: Path) -> bool:
    """Whether a failed slide's error.json goes into its folder: not over a finished result
    (an --overwrite that failed keeps the previous result, which stays listed as done)."""
    return not is_done(slide_dir)


def results_lock(out: Path, lock: LockParams | None, log: Any = None) -> WriterLock:
    """The results folder's writer lock (``OUT/.histoduo.lock``)."""
    lock = lock or LockParams()
    return WriterLock(
        folder_lock_path(out),
        what=f"results folder {out}",
        wait_s=lock.wait_s,
        clear_dead=lock.clear_dead,
        log=log,
    )


def folder_slides(out: Path, this_run: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One manifest row per slide folder in ``out`` (what is actually there), with this
    run's outcome where it touched the slide and the checkpoint that made each result."""
    outcomes = {row["slide"]: row for row in this_run}
    rows = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        row: dict[str, Any] = dict(outcomes.get(folder.name, {"slide": folder.name}))
        if is_done(folder):
            try:
                summary = SlideSummary.read(folder)
            except (OSError, ValueError):
                continue
            row.setdefault("status", "done")
            row.setdefault("n_tiles", summary.n_tiles)
            row.setdefault("call", summary.grade.get("call", ""))
            row["result"] = "done"
            row["checkpoint"] = summary.checkpoint
            row["checkpoint_sha256"] = summary.checkpoint_sha256
        elif (folder / ERROR_FILE).exists():
            row.setdefault("status", "error")
            row["result"] = "error"
        else:
            continue  # not a slide folder of ours (or an interrupted one)
        rows.append(row)
    return rows
