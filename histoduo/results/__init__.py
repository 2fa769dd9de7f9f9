"""A results folder: its file names and typed summary (layout), per-tile scores, tables, maps,
figures, the HTML report, and redrawing everything from saved scores without the model."""
