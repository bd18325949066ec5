from __future__ import annotations

import textwrap
from typing import Any

import click

from posthoc.checkpoint import DEFAULT_SHARD_SIZE
from posthoc.merge.config import MergeConfig
from posthoc.merge.engine import merge as merge_checkpoints
from posthoc.merge.registry import REGISTRY

from .main import KeyValue, main, parse_size, reports_errors


def _methods_help() -> str:
    """Each method, its summary and its parameters (as the registry declares them)."""
    lines = []
    for m in REGISTRY.values():
        lines.append(f"  {m.name:<17} {m.summary}")
        lines += textwrap.wrap(m.describe(), width=98, initial_indent=" " * 20, subsequent_indent=" " * 20)
    return "\n".join(lines)


@main.command(epilog="\b\nMethods:\n" + _methods_help())
@click.argument("args", nargs=-1, metavar="CONFIG.yml OUT_DIR | MODEL...")
@click.option("--method", help="Flag form: merge MODELs with this method instead of reading a config.")
@click.option("--base", help="Flag form: the base model.")
@click.option("-o", "--output", help="Flag form: output directory.")
@click.option("--weight", "weights", type=float, multiple=True, help="Flag form: one weight, or one per model (default 1).")
@click.option("--density", type=float, help="Flag form: fraction of each task vector kept (TIES, DARE …).")
@click.option("--lambda", "lambda_", type=float, help="Flag form: scale of the merged task vector.")
@click.option("--t", "t", type=float, help="Flag form: slerp interpolation factor (0 = base).")
@click.option("--set", "sets", type=KeyValue(), multiple=True, metavar="KEY=VALUE",
              help="Flag form: any other method parameter (a YAML value).")
@click.option("--dtype", help="Round inputs to this dtype before merging (as mergekit's `dtype`).")
@click.option("--out-dtype", help="dtype of the written tensors.")
@click.option("--seed", type=int, help="Seed of randomized methods (DARE, DELLA); recorded in the output.")
@click.option("--shard-size", default=f"{DEFAULT_SHARD_SIZE // 10**9}GB", show_default=True, help="Max bytes per shard (5GB, 500MB …).")
@click.option("--rank", type=int, help="All inputs LoRA modules: re-factor the merged LoRA to this rank (default: exact).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("-j", "--threads", type=click.IntRange(min=1), help="CPU threads (default: torch's setting, all cores).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def merge(
    args: tuple[str, ...],
    method: str | None,
    base: str | None,
    output: str | None,
    weights: tuple[float, ...],
    density: float | None,
    lambda_: float | None,
    t: float | None,
    sets: tuple[tuple[str, Any], ...],
    dtype: str | None,
    out_dtype: str | None,
    seed: int | None,
    shard_size: str,
    rank: int | None,
    force: bool,
    threads: int | None,
    quiet: bool,
) -> None:
    """Merge checkpoints described by a mergekit-style CONFIG.yml into OUT_DIR, or, in the flag form,
    `posthoc merge --method ties --base B M1 M2 --density 0.2 -o OUT`.

    Inputs are checked for compatibility first; the output appears only when complete."""
    if method is None:
        if len(args) != 2:
            raise click.UsageError("expected CONFIG.yml OUT_DIR (or --method … MODEL… -o OUT)")
        config = MergeConfig.from_yaml(args[0])
        out_dir = args[1]
        if dtype or out_dtype:
            raise click.UsageError("--dtype/--out-dtype belong to the flag form; set dtype/out_dtype in the YAML")
    else:
        if not args or output is None:
            raise click.UsageError("the flag form needs MODEL… and -o OUT_DIR")
        settings = dict(sets)
        for key, value in (("density", density), ("lambda", lambda_), ("t", t)):
            if value is not None:
                settings[key] = value
        config = MergeConfig.from_flags(method, base, args, weights, settings, dtype=dtype, out_dtype=out_dtype)
        out_dir = output
    result = merge_checkpoints(
        config, out_dir, force=force, shard_size=parse_size(shard_size), seed=seed, progress=not quiet, rank=rank,
        threads=threads,
    )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if getattr(result, "summary", None):  # an all-module merge wrote a module
        click.echo(result.summary)
    seed_note = f", seed {result.seed}" if result.seed is not None else ""
    click.echo(
        f"wrote {result.out_dir}: {result.num_tensors} tensors, {result.total_bytes / 1e9:.2f} GB in "
        f"{result.num_shards} shard(s), {result.seconds:.1f} s{seed_note}"
    )
