"""`histoduo demo` at a small size: every output it promises exists and the summary is true."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from histoduo.cli import app


def test_demo_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--slides", "3", "--slide-size", "3072", "--epochs", "3",
              "--iterations", "10", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["slide_truth"] == "high_grade"
    assert summary["held_out_tiles"] > 50
    # The demo's promise: a small DuoFormer learns the synthetic classes and calls the
    # held-out slide's high-grade focus (an untrained model sits near chance, 0.25).
    assert summary["held_out_balanced_accuracy"] > 0.8
    assert summary["slide_call"] == summary["slide_truth"]
    for path in summary["outputs"].values():
        assert Path(path).exists(), path
    flat = " ".join(result.output.split())
    assert "slide-level call" in flat and "balanced accuracy" in flat
