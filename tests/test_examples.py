"""The README's commands and the examples/ scripts, run as a user would, at a small size."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _readme_commands() -> list[list[str]]:
    """Every `histoduo ...` line inside the README's bash blocks, as argument lists."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        parts = [p for line in block.replace("\\\n", " ").splitlines() for p in line.split("&&")]
        for part in parts:
            words = shlex.split(part.strip())
            if words and words[0].endswith("histoduo"):
                commands.append(words[1:])
    return commands


def test_readme_commands_use_real_options() -> None:
    import typer.main

    from histoduo.cli import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="histoduo")
    commands = _readme_commands()
    assert len(commands) >= 4  # demo, tile, train, predict
    for words in commands:
        command = group.get_command(ctx, words[0])
        assert command is not None, f"README uses unknown command {words[0]!r}"
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        used = {w.split("=")[0] for w in words[1:] if w.startswith("-")}
        assert used <= known, f"README: histoduo {words[0]} has no {sorted(used - known)}"


def test_example_tile_train_predict(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SLIDE_PX": "3072",
           "EPOCHS": "1", "ITERATIONS": "3"}  # fmt: skip
    result = subprocess.run(
        ["bash", str(ROOT / "examples" / "tile_train_predict.sh"), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "tiles.h5").exists() and (run / "runs/ccrcc/best.pt").exists()
    assert (run / "results/held_out/class_map.png").exists()
    assert "held_out" in (run / "results/slides.csv").read_text()


def test_example_python_api(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "slide-level call: high_grade" in result.stdout
    assert "tiles" in result.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_cli_answers_fast_without_heavy_imports(args: list[str]) -> None:
    code = (
        "import sys; from histoduo.cli import app\n"
        "try:\n    app(" + repr(args) + ")\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'timm', 'openslide', 'tiffslide', 'h5py')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
