"""Documentation that must stay true to the code."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current() -> None:
    from histoduo.cli.doc import render

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == render(), (
        "docs/cli.md is stale: regenerate it with `python -m histoduo.cli.doc > docs/cli.md`"
    )


def test_cli_reference_covers_every_command() -> None:
    import typer
    from typer.testing import CliRunner

    from histoduo.cli import app

    text = (ROOT / "docs" / "cli.md").read_text()
    help_text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    commands = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"tile", "train", "predict", "heatmap", "convert-checkpoint"} <= set(commands)
    for command in commands:
        assert command in help_text
        assert f"## `histoduo {command}`" in text, f"docs/cli.md lacks `histoduo {command}`"
