"""``lily-deploy inspect``."""
import json

import click

from .options import base_option


@click.command("inspect")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(), default=None, help="Data file for router statistics.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(min=1), help="Rows of --data to use.")
@click.option("--text-column", default=None, help="Text column of --data (default: text or sentence).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@base_option
def command(model_dir, data, size, text_column, as_json, base):
    """Show the Lily structure of an adapter folder or deploy checkpoint MODEL_DIR.

    Base model, targets, rank, LP groups, HP pools, parameter counts; with --data, each
    layer's router statistics (mean mixing vector, its spread across samples, entropy).
    """
    from ..inspection import describe, format_table

    info = describe(model_dir, data=data, base=base, size=size, text_column=text_column)
    click.echo(json.dumps(info, indent=2) if as_json else format_table(info))
