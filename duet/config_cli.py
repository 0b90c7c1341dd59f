"""`duet config-reference`: print the configuration reference generated from the settings model.

A typer app of its own (mounted in duet/cli.py with `add_typer`) so the command lives beside the
renderer it wraps; `duet config-reference > docs/configuration.md` regenerates the checked-in page.
"""

from __future__ import annotations

import typer

config_app = typer.Typer(help="Print the configuration reference (Markdown) generated from the settings model.")


@config_app.callback(invoke_without_command=True)
def config_reference() -> None:
    """Print every setting (environment variable, type, default, description) as a Markdown page.

    Regenerate the docs with `duet config-reference > docs/configuration.md`.
    """
    from duet.config_reference import render_markdown

    typer.echo(render_markdown(), nl=False)
