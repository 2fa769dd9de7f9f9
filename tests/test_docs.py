"""Documentation that must stay true to the code."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current() -> None:
    from histoduo.clidoc import render

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == render(), (
        "docs/cli.md is stale: regenerate it with `python -m histoduo.clidoc > docs/cli.md`"
    )


def test_cli_reference_covers_every_command() -> None:
    from typer.testing import CliRunner

    from histoduo.cli import app

    text = (ROOT / "docs" / "cli.md").read_text()
    help_text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    for command in (
        "info",
        "tissue",
        "tile",
        "merge",
        "synth",
        "model-info",
        "predict",
        "train",
        "evaluate",
        "demo",
        "import",
    ):
        assert command in help_text
        assert f"## `histoduo {command}`" in text
