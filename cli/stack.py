from __future__ import annotations

import click

from posthoc.checkpoint import DEFAULT_SHARD_SIZE
from posthoc.modules.apply import stack as stack_modules

from .main import main, parse_size, reports_errors


@main.command()
@click.argument("base")
@click.argument("out_dir")
@click.option("--module", "modules", multiple=True, required=True, help="A module or PEFT adapter directory (repeat).")
@click.option("--scale", "scales", type=float, multiple=True, help="One per --module, in order (default 1 each).")
@click.option("--mask-mode", type=click.Choice(["keep", "remove"]), default="keep", show_default=True,
              help="Mask modules (clusters, subnetworks): keep only what they mark, or remove it.")
@click.option("--as-module", is_flag=True, help="Write Σ sᵢφᵢ as one module instead of a checkpoint.")
@click.option("--rank", type=int, help="--as-module with LoRA inputs: re-factor the sum to this rank (default: exact).")
@click.option("--allow-base-mismatch", is_flag=True, help="Apply modules made for another base (with a warning).")
@click.option("--shard-size", default=f"{DEFAULT_SHARD_SIZE // 10**9}GB", show_default=True, help="Max bytes per shard.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def stack(
    base: str, out_dir: str, modules: tuple[str, ...], scales: tuple[float, ...], mask_mode: str, as_module: bool,
    rank: int | None, allow_base_mismatch: bool, shard_size: str, force: bool, quiet: bool,
) -> None:
    """Compose modules additively onto BASE: θ = θ₀ + Σ sᵢφᵢ, written to OUT_DIR as a checkpoint that
    transformers loads (or, with --as-module, as one combined module). Mask modules are applied last
    (--mask-mode keep|remove)."""
    result = stack_modules(
        base, modules, out_dir, scales=scales or None, as_module=as_module, allow_base_mismatch=allow_base_mismatch,
        rank=rank, force=force, progress=not quiet, shard_size=parse_size(shard_size), mask_mode=mask_mode,
    )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    what = f"module ({result.kind})" if result.as_module else "checkpoint"
    error = f"; largest re-factoring error {result.refactor_error:.2e}" if result.refactor_error else ""
    click.echo(f"wrote {what} {result.out_dir}: {result.num_tensors} tensors changed, "
               f"{result.total_bytes / 1e6:.1f} MB, {result.seconds:.1f} s{error}")
