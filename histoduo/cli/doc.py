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
