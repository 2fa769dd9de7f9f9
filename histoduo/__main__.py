"""``python -m histoduo`` runs the CLI."""

from histoduo.cli import app

app()
