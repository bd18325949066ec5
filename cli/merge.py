from __future__ import annotations

from typing import Any

import click
import yaml

from posthoc.checkpoint import DEFAULT_SHARD_SIZE
from posthoc.errors import ConfigError
from posthoc.merge.config import MergeConfig
from posthoc.merge.engine import merge as merge_checkpoints
from posthoc.merge.registry import REGISTRY

from .main import main, parse_size, reports_errors


def _methods_help() -> str:
    return "\n".join(f"  {m.name:<17} {m.summary}" for m in REGISTRY.values())


def _flag_config(
    method: str, base: str | None, models: tuple[str, ...], weights: tuple[float, ...], settings: dict[str, Any]
) -> dict[str, Any]:
    """The YAML a flag-form merge stands for."""
    if weights and len(weights) not in (1, len(models)):
        raise ConfigError(f"give one --weight for all models or one per model ({len(models)}), got {len(weights)}")
    spec = REGISTRY.get(method)
    entries = []
    for i, model in enumerate(models):
        parameters = {}
        if spec is not None and "weight" in spec.params:
            parameters["weight"] = weights[i] if len(weights) == len(models) else (weights[0] if weights else 1.0)
        entries.append({"model": model, **({"parameters": parameters} if parameters else {})})
    config: dict[str, Any] = {"merge_method": method, "models": entries}
    if base:
        config["base_model"] = base
    if settings:
        config["parameters"] = settings
    return config


def _parse_set(values: tuple[str, ...]) -> dict[str, Any]:
    settings = {}
    for item in values:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        settings[key.strip()] = yaml.safe_load(value)
    return settings


@main.command(epilog="\b\nMethods:\n" + _methods_help())
@click.argument("args", nargs=-1, metavar="CONFIG.yml OUT_DIR | MODEL...")
@click.option("--method", help="Flag form: merge MODELs with this method instead of reading a config.")
@click.option("--base", help="Flag form: the base model.")
@click.option("-o", "--output", help="Flag form: output directory.")
@click.option("--weight", "weights", type=float, multiple=True, help="Flag form: one weight, or one per model (default 1).")
@click.option("--density", type=float, help="Flag form: fraction of each task vector kept (TIES, DARE …).")
@click.option("--lambda", "lambda_", type=float, help="Flag form: scale of the merged task vector.")
@click.option("--t", "t", type=float, help="Flag form: slerp interpolation factor (0 = base).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Flag form: any other method parameter.")
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
    sets: tuple[str, ...],
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
        settings = _parse_set(sets)
        for key, value in (("density", density), ("lambda", lambda_), ("t", t)):
            if value is not None:
                settings[key] = value
        data = _flag_config(method, base, args, weights, settings)
        if dtype:
            data["dtype"] = dtype
        if out_dtype:
            data["out_dtype"] = out_dtype
        config = MergeConfig.from_dict(data, where="flags")
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
