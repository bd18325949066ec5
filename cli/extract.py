from __future__ import annotations

import click

from posthoc.checkpoint import DEFAULT_SHARD_SIZE
from posthoc.modules.extraction import EXTRACT_KINDS
from posthoc.modules.extraction import extract as extract_module

from .main import KeyValue, main, parse_size, reports_errors


@main.command()
@click.argument("base")
@click.argument("tuned")
@click.argument("out_dir")
@click.option("--kind", type=click.Choice(EXTRACT_KINDS), default="delta", show_default=True,
              help="delta: the task vector; sparse: its largest entries (LT-SFT); lora: truncated SVD per matrix.")
@click.option("--density", type=float, help="sparse: fraction of entries kept, in (0, 1].")
@click.option("--per-tensor", is_flag=True, help="sparse: keep the density within each tensor instead of over the model.")
@click.option("--rank", type=int, help="lora: rank of every factored matrix.")
@click.option("--energy", type=float, help="lora: smallest rank keeping this share of each matrix's ‖Δ‖² (0, 1].")
@click.option("--max-rank", type=int, help="lora: cap of the rank --energy picks.")
@click.option("--full", "full", multiple=True, metavar="SUBSTRING", help="lora: keep tensors whose name contains this whole.")
@click.option("--calib", type=click.Path(dir_okay=False), help="Text file (one text per line): measure agreement with the fine-tune.")
@click.option("--calib-limit", type=int, default=256, show_default=True, help="At most this many calibration texts.")
@click.option("--tag", "tags", type=KeyValue(as_text=True, example="task=news"), multiple=True, metavar="KEY=VALUE",
              help="Free tags in the manifest (task=…, language=…).")
@click.option("--shard-size", default=f"{DEFAULT_SHARD_SIZE // 10**9}GB", show_default=True, help="Max bytes per module shard.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def extract(
    base: str, tuned: str, out_dir: str, kind: str, density: float | None, per_tensor: bool, rank: int | None,
    energy: float | None, max_rank: int | None, full: tuple[str, ...], calib: str | None, calib_limit: int,
    tags: tuple[tuple[str, str], ...], shard_size: str, force: bool, quiet: bool,
) -> None:
    """Turn the fine-tune TUNED of BASE into a module in OUT_DIR (delta, sparse or LoRA), with a fidelity
    report (fidelity.json, report.html). A lora module is also a PEFT adapter directory."""
    result = extract_module(
        base, tuned, out_dir, kind=kind, density=density, per_tensor=per_tensor, rank=rank, energy=energy,
        max_rank=max_rank, full=full, calib=calib, calib_limit=calib_limit, tags=dict(tags), force=force,
        progress=not quiet, shard_size=parse_size(shard_size),
    )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    for line in result.lines():
        click.echo(line)
    click.echo(f"wrote {result.out_dir} ({result.stored_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s; report: "
               f"{result.out_dir / 'report.html'}")
