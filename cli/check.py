from __future__ import annotations

import contextlib
import sys

import click

from posthoc.checkpoint import open_checkpoint
from posthoc.compat import check_compatible

from .main import main, reports_errors


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--base", "base", default=None, help="Reference model (default: the first MODEL).")
@reports_errors
def check(models: tuple[str, ...], base: str | None) -> None:
    """Compatibility report of MODELS before any merge: architectures, tensor names, shapes, dtypes,
    vocabulary sizes and tied embeddings. Exits 1 when they cannot be merged."""
    with contextlib.ExitStack() as stack:  # every checkpoint opened is closed, also when a later one fails
        opened = [stack.enter_context(open_checkpoint(m)) for m in ([base] if base else []) + list(models)]
        report = check_compatible(opened, reference=opened[0])
    click.echo(report.render())
    if not report.ok:
        sys.exit(1)
