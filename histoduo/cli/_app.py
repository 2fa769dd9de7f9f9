"""The Typer application object shared by every command module."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from histoduo import __version__
from histoduo.runtime.errors import HistoduoError, output_error


class _Commands(TyperGroup):
    """The command group; a HistoduoError (or a full, read-only or forbidden output) that a
    command did not handle ends as one clear line on stderr and exit 1, never a traceback."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except HistoduoError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            error = output_error(exc)
            if error is None:
                raise
            raise fail(str(error)) from None


app = typer.Typer(
    cls=_Commands,
    name="histoduo",
    help="Whole-slide histopathology: tissue detection, tiling, DuoFormer training, "
    "ccRCC grade prediction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"histoduo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """histoduo: from scanned slides to graded reports."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error in red to stderr and return the Exit to raise."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)
