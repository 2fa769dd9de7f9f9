"""--shard K/N, auto and auto/N (a SLURM array's environment) and shard outputs; no SLURM needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from histoduo.cli import app
from histoduo.slide.shards import (
    ShardError,
    default_shard_output,
    parse_shard_text,
    shard_output,
    shard_store_path,
)
from histoduo.slide.sources import SlideSource, select_shard


def _array(task: int, low: int, high: int, count: int | None = None, step: int | None = None):
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(low),
        "SLURM_ARRAY_TASK_MAX": str(high),
    }
    if count is not None:
        env["SLURM_ARRAY_TASK_COUNT"] = str(count)
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return env


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (_array(1, 1, 3, 3, 1), (1, 3)),  # sbatch --array=1-3
        (_array(3, 1, 3, 3, 1), (3, 3)),
        (_array(0, 0, 7, 8), (1, 8)),  # --array=0-7: 0-based indices, 1-based shards
        (_array(7, 0, 7, 8), (8, 8)),
        (_array(5, 1, 9, 5, 2), (3, 5)),  # --array=1-9:2 -> 1,3,5,7,9
        (_array(2, 1, 4), (2, 4)),  # no _COUNT: MIN and MAX suffice
        (_array(1, 1, 1, 1), (1, 1)),  # a one-task array
    ],
)
def test_auto_reads_the_array_task(env: dict[str, str], expected: tuple[int, int]) -> None:
    assert parse_shard_text("auto", env) == expected
    assert parse_shard_text(" AUTO ", env) == expected


def test_auto_from_min_and_count_only() -> None:
    env = _array(12, 10, 0, 4)
    del env["SLURM_ARRAY_TASK_MAX"]
    assert parse_shard_text("auto", env) == (3, 4)


def test_every_task_of_an_array_gets_a_different_shard() -> None:
    shards = [parse_shard_text("auto", _array(t, 0, 4, 5)) for t in range(5)]
    assert shards == [(k, 5) for k in range(1, 6)]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "SLURM_ARRAY_TASK_ID is not set"),
        ({"SLURM_JOB_ID": "5"}, "not running as a task of `sbatch --array`"),
        ({"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_MIN"),
        (_array(4, 1, 9, 3), "needs an array that is a range"),  # --array=1,4,9
        (_array(5, 1, 3, 3), "task 5 is not in the array"),
        ({**_array(1, 1, 3), "SLURM_ARRAY_TASK_ID": "x"}, "is not a whole number"),
        (_array(4, 4, 4, 1), "looks like a rerun of one shard"),  # sbatch --array=4
    ],
)
def test_auto_refuses_what_it_cannot_read(env: dict[str, str], message: str) -> None:
    with pytest.raises(ShardError, match=message):
        parse_shard_text("auto", env)


def test_auto_over_n_takes_the_index_as_k() -> None:
    # A rerun of task 4 alone: SLURM reports an array of one task, N comes from the flag.
    assert parse_shard_text("auto/8", _array(4, 4, 4, 1)) == (4, 8)
    with pytest.raises(ShardError, match="index 0 is not a shard 1..8"):
        parse_shard_text("auto/8", _array(0, 0, 7, 8))
    with pytest.raises(ShardError, match="needs a whole number N"):
        parse_shard_text("auto/x", _array(1, 1, 2))
    with pytest.raises(ShardError, match="SLURM_ARRAY_TASK_ID is not set"):
        parse_shard_text("auto/8", {})


def test_k_of_n_is_unchanged() -> None:
    assert parse_shard_text("2/8") == (2, 8)
    assert parse_shard_text(None) is None
    for bad in ("0/8", "9/8", "2", "a/b", "2/8/1"):
        with pytest.raises(ShardError):
            parse_shard_text(bad)


def test_shard_output_names() -> None:
    assert shard_output("out/tiles.{shard}.h5", (2, 8)) == Path("out/tiles.2-of-8.h5")
    assert shard_output("out/tiles.h5", (2, 8)) == Path("out/tiles.h5")
    with pytest.raises(ShardError, match="has \\{shard\\} but no --shard"):
        shard_output("tiles.{shard}.h5", None)
    assert default_shard_output("out/tiles.h5", (3, 4)) == Path("out/tiles.shard-3-of-4.h5")
    assert default_shard_output("out/tiles", (3, 4)) == Path("out/tiles.shard-3-of-4")
    # auto: one command line for every task, so a per-shard name unless {shard} says where
    assert shard_store_path("t.h5", "auto", (1, 2)) == Path("t.shard-1-of-2.h5")
    assert shard_store_path("t.{shard}.h5", "auto", (1, 2)) == Path("t.1-of-2.h5")
    assert shard_store_path("t.h5", "1/2", (1, 2)) == Path("t.h5")  # K/N: as given, as before
    assert shard_store_path("t.h5", None, None) == Path("t.h5")


def test_auto_shards_partition_a_cohort() -> None:
    sources = [SlideSource(Path(f"s{i}.svs")) for i in range(40)]
    seen = []
    for task in range(1, 5):
        seen += [
            s.name for s in select_shard(sources, parse_shard_text("auto", _array(task, 1, 4)))
        ]
    assert sorted(seen) == sorted(s.name for s in sources)


def test_tile_cli_auto_outside_slurm_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"not read: the shard is checked first")
    result = CliRunner().invoke(
        app, ["tile", str(slide), "--out", str(tmp_path / "t.h5"), "--shard", "auto"]
    )
    assert result.exit_code == 1
    assert "SLURM_ARRAY_TASK_ID is not set" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "t.h5").exists()


def test_auto_array_tiles_into_per_shard_stores_that_merge_to_one_run(
    tmp_path: Path, svs_slide, svs_slide_b, monkeypatch
) -> None:
    """Every task of a 3-task array runs the same command line; empty shards succeed."""
    from histoduo.store import TileStore

    slides = [str(svs_slide.path), str(svs_slide_b.path)]
    args = ["--mpp", "2.0", "--tile-size", "64", "--workers", "0", "--quiet"]
    runner = CliRunner()
    reference = tmp_path / "ref.h5"
    assert runner.invoke(app, ["tile", *slides, "--out", str(reference), *args]).exit_code == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "2")
    outputs = []
    for task in range(3):  # --array=0-2
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        cmd = ["tile", *slides, "--out", str(tmp_path / "tiles.h5"), "--shard", "auto", *args]
        result = runner.invoke(app, cmd)
        assert result.exit_code == 0, result.output
        outputs.append(tmp_path / f"tiles.shard-{task + 1}-of-3.h5")
    assert all(p.exists() for p in outputs)  # an empty shard still leaves its (empty) store
    assert not (tmp_path / "tiles.h5").exists()
    merged = tmp_path / "merged.h5"
    result = runner.invoke(app, ["merge", *map(str, outputs), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    with TileStore(reference) as ref, TileStore(merged) as got:
        assert sorted(got.slides) == sorted(ref.slides) == ["svs_a", "svs_b"]
        for name in ref.slides:
            assert (got.coords(name) == ref.coords(name)).all()
