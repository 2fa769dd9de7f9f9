"""Shards of a cohort: ``--shard K/N``, ``--shard auto`` (a SLURM array job) and shard outputs.

Which slides shard K gets is :func:`histoduo.slide.sources.select_shard` (a hash of the slide name);
this module only says which K and N a process is, and how its outputs are named:

- ``--shard K/N``: 1-based K of N, given by hand (or by a Snakemake/Nextflow rule per shard).
- ``--shard auto``: K and N from the environment SLURM gives each task of an array job
  (``SLURM_ARRAY_TASK_ID`` with ``_MIN``/``_MAX``, ``_STEP`` or ``_COUNT``), so every task of
  ``sbatch --array=1-N`` (or ``0-(N-1)``) runs the same command line.
- ``--shard auto/N``: K is the array index itself (submit ``--array=1-N``), N is given; use it to
  rerun one failed task alone (``sbatch --array=K``), where SLURM reports an array of one task.

An output path containing ``{shard}`` gets ``K-of-N`` in its place (``tiles.{shard}.h5`` ->
``tiles.2-of-8.h5``), the same label as predict's ``manifest.shard-K-of-N.json``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SHARD_FIELD = "{shard}"
AUTO = "auto"


class ShardError(ValueError):
    """A --shard value or the array job's environment cannot give a shard (message says why)."""


def parse_shard_text(
    text: str | None, env: Mapping[str, str] | None = None
) -> tuple[int, int] | None:
    """'K/N', 'auto' or 'auto/N' -> (K, N) with 1 <= K <= N; None passes through.

    ``env`` defaults to ``os.environ`` (the SLURM variables of ``auto``).
    """
    if text is None:
        return None
    value = text.strip()
    head, _, tail = value.partition("/")
    if head.strip().lower() == AUTO:
        env = os.environ if env is None else env
        if not tail:
            return shard_from_slurm(env)
        return shard_from_slurm_index(env, _positive_int(tail, value))
    try:
        k_text, n_text = value.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ShardError(
            f"--shard must look like K/N (e.g. 2/8), auto or auto/N, got {text!r}"
        ) from None
    if n < 1 or not 1 <= k <= n:
        raise ShardError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def _positive_int(text: str, whole: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ShardError(f"--shard auto/N needs a whole number N, got {whole!r}") from None
    if n < 1:
        raise ShardError(f"--shard auto/N needs N >= 1, got {whole!r}")
    return n


def _slurm_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ShardError(f"--shard auto: {name}={raw!r} is not a whole number") from None


def _task_id(env: Mapping[str, str]) -> int:
    task = _slurm_int(env, "SLURM_ARRAY_TASK_ID")
    if task is None:
        where = "a SLURM job" if env.get("SLURM_JOB_ID") else "SLURM"
        raise ShardError(
            "--shard auto takes the shard from a SLURM array job, but SLURM_ARRAY_TASK_ID is "
            f"not set (not running as a task of `sbatch --array`; outside {where}, give "
            "--shard K/N)"
        )
    return task


def shard_from_slurm(env: Mapping[str, str]) -> tuple[int, int]:
    """(K, N) of this task of a SLURM array job, from its environment.

    The array must be a range, ``--array=A-B`` or ``--array=A-B:S`` (any A: 0- and 1-based both
    work); K counts tasks from 1 in index order. A list such as ``--array=1,4,9`` has no shard
    arithmetic and is refused, as is a one-task array whose index is not 0 or 1 (a rerun of one
    shard, which would otherwise take the whole cohort as shard 1 of 1: use ``auto/N``).
    """
    task = _task_id(env)
    low = _slurm_int(env, "SLURM_ARRAY_TASK_MIN")
    high = _slurm_int(env, "SLURM_ARRAY_TASK_MAX")
    step = _slurm_int(env, "SLURM_ARRAY_TASK_STEP") or 1
    count = _slurm_int(env, "SLURM_ARRAY_TASK_COUNT")
    if low is None or (high is None and count is None):
        raise ShardError(
            "--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_MIN and "
            "SLURM_ARRAY_TASK_MAX (or _COUNT) are not; give --shard K/N"
        )
    if step < 1:
        raise ShardError(f"--shard auto: SLURM_ARRAY_TASK_STEP={step} must be >= 1")
    if high is None:  # MIN and COUNT only: a range with the given step
        high = low + (count - 1) * step
    span = high - low
    n = span // step + 1
    if span < 0 or span % step or (count is not None and count != n):
        raise ShardError(
            f"--shard auto needs an array that is a range (--array=A-B or A-B:S); this one "
            f"has {count} tasks between {low} and {high}: give --shard K/N"
        )
    if not low <= task <= high or (task - low) % step:
        raise ShardError(f"--shard auto: task {task} is not in the array {low}-{high}:{step}")
    if n == 1 and low not in (0, 1):
        raise ShardError(
            f"--shard auto: a one-task array with index {low} looks like a rerun of one shard; "
            f"give the number of shards with --shard auto/N (or --shard {low}/N)"
        )
    return (task - low) // step + 1, n


def shard_from_slurm_index(env: Mapping[str, str], n: int) -> tuple[int, int]:
    """(K, N) for ``--shard auto/N``: K is the array index itself, 1 <= K <= N."""
    task = _task_id(env)
    if not 1 <= task <= n:
        raise ShardError(
            f"--shard auto/{n}: array index {task} is not a shard 1..{n} (submit --array=1-{n})"
        )
    return task, n


def shard_label(shard: tuple[int, int]) -> str:
    """``K-of-N``: the name part of shard K's outputs."""
    return f"{shard[0]}-of-{shard[1]}"


def shard_output(path: str | Path, shard: tuple[int, int] | None) -> Path:
    """``path`` with ``{shard}`` replaced by ``K-of-N``; unchanged when it has none.

    Raises ShardError when the path asks for a shard label but no shard was given (or the
    field is spelt with other braces), so no file literally named ``{shard}`` is written.
    """
    text = str(path)
    if SHARD_FIELD not in text:
        return Path(path)
    if shard is None:
        raise ShardError(f"{text}: the output name has {SHARD_FIELD} but no --shard was given")
    return Path(text.replace(SHARD_FIELD, shard_label(shard)))


def default_shard_output(path: str | Path, shard: tuple[int, int]) -> Path:
    """``tiles.h5`` -> ``tiles.shard-K-of-N.h5``: one file per shard next to the asked-for one.

    For ``--shard auto`` with an output that has no ``{shard}``: the tasks of an array run the
    same command line, and must never write one file together.
    """
    p = Path(path)
    suffix = p.suffix
    stem = p.name[: -len(suffix)] if suffix else p.name
    return p.with_name(f"{stem}.shard-{shard_label(shard)}{suffix}")


def is_auto(text: str | None) -> bool:
    """Whether a --shard value asks SLURM for the shard (``auto`` or ``auto/N``)."""
    return text is not None and text.strip().partition("/")[0].strip().lower() == AUTO


def shard_store_path(path: str | Path, text: str | None, shard: tuple[int, int] | None) -> Path:
    """Where a shard writes a single-file output (a tile store) asked for as ``path``.

    ``{shard}`` in the name is replaced by ``K-of-N``; without it, ``--shard auto`` writes
    :func:`default_shard_output` (array tasks share one command line, so one ``--out``), and
    ``--shard K/N`` writes ``path`` as given (each job was handed its own name).
    """
    if SHARD_FIELD in str(path) or shard is None or not is_auto(text):
        return shard_output(path, shard)
    return default_shard_output(path, shard)
