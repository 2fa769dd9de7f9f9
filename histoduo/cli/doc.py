"""The CLI reference (docs/cli.md), generated from the Typer app so it cannot drift.

python -m histoduo.cli.doc > docs/cli.md
"""

from __future__ import annotations

from typing import Any

# Typer ships its own copy of click, so parameters are recognised by their attributes.


def _type_name(param: Any) -> str:
    """'float', 'path', 'int', 'text' ... from the option's annotation."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    text = getattr(annotation, "__name__", None) or str(annotation)
    text = text.replace(" | None", "").replace("pathlib.", "").lower()
    return {"str": "text"}.get(text, text)


def _param_row(param: Any) -> str:
    is_argument = param.param_type_name == "argument"
    if is_argument:
        name = f"`{param.name.upper()}`"
        kind = "argument" + (" (one or more)" if param.nargs == -1 else "")
    else:
        names = list(param.opts) + list(param.secondary_opts)
        name = ", ".join(f"`{n}`" for n in names)
        kind = "flag" if param.is_flag else _type_name(param)
    default = param.default
    shown = ""
    if (
        not is_argument
        and default not in (None, False, (), [])
        and getattr(param, "show_default", True) is not False
    ):
        shown = f"`{default}`"
    help_text = " ".join((getattr(param, "help", None) or "").split()).replace("|", "\\|")
    return f"| {name} | {kind} | {shown} | {help_text} |"


def _exit_status_notes() -> list[str]:
    from histoduo.runtime.exitcodes import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED

    return [
        "## Exit status",
        "",
        "Every command exits with one of these (`histoduo.runtime.exitcodes`), so a scheduler",
        "(SLURM's `afterok`) sees a shard that had failures:",
        "",
        "| status | meaning |",
        "|---|---|",
        f"| {EXIT_OK} | everything asked for was done (or was already done) |",
        f"| {EXIT_ERROR} | the run stopped: bad input, or a slide failed without `--skip-errors` "
        "(finished slides are kept; rerun to resume) |",
        "| 2 | the command line itself was wrong (unknown option, bad value) |",
        f"| {EXIT_SOME_FAILED} | `--skip-errors`: every slide (image, for `import`) was tried and "
        "every table written, but some failed; they are listed in the run's report or manifest |",
        "",
        "`--skip-errors` means the same for `tile`, `tissue`, `import` and `predict`: any failure "
        "of one slide, whatever its type, is recorded with the slide and the run goes on.",
        "",
    ]


def render() -> str:
    import typer.main

    from histoduo.cli import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="histoduo")
    lines = [
        "# histoduo command reference",
        "",
        "Generated from the code by `python -m histoduo.cli.doc > docs/cli.md`; a test fails when",
        "this file is out of date. `histoduo COMMAND --help` shows the same.",
        "",
        *_exit_status_notes(),
    ]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        lines += [f"## `histoduo {name}`", ""]
        doc = " ".join((command.help or "").split("\n\n")[0].split())
        if doc:
            lines += [doc, ""]
        params = [p for p in command.params if p.name != "help"]
        if params:
            lines += ["| option | kind | default | meaning |", "|---|---|---|---|"]
            lines += [_param_row(p) for p in params]
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
