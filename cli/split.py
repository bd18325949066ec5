"""`posthoc split …`: find modules inside a trained dense model. Each analyser is one subcommand:

    @split.command("NAME")
    @analyser_options(PARAMS, ["experts", …])   # options generated from the analyser's parameter table
    @reports_errors
    def name(...): ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from posthoc.analyse.params import ParamTable

from .main import main, reports_errors


@main.group()
def split() -> None:
    """Find modules inside a trained dense model (MoE-fication into experts, …)."""


def analyser_options(table: ParamTable, names: Sequence[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options for these parameters of an analyser, with defaults, choices and help from its table."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            p = table[name]
            flag = "--" + name.replace("_", "-")
            if isinstance(p.default, bool):
                option = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=p.default,
                                       show_default=True, help=p.help)
            elif p.choices:
                option = click.option(flag, name, type=click.Choice(p.choices), default=p.default,
                                      show_default=True, help=p.help)
            else:
                kind = type(p.default) if p.default is not None else (int if name in ("router_hidden", "threads", "heal_tokens") else str)
                option = click.option(flag, name, type=kind, default=p.default, show_default=p.default is not None,
                                      help=p.help)
            fn = option(fn)
        return fn

    return decorate


def _moe_table() -> ParamTable:
    from posthoc.analyse.moe.moefier import PARAMS

    return PARAMS


MOE_OPTIONS = (
    "experts", "top_k", "partition", "router", "gate_up_scale", "kernel", "shared", "score", "routing", "layer_budget", "compensation",
    "layer_heal_epochs", "layer_heal_ffn_lr", "heal_steps", "heal_lr", "lora_rank", "heal_batch_size", "heal_tokens", "heal_hidden",
    "heal_biases", "heal_ffn_lr", "max_tokens", "router_tokens", "router_epochs", "kmeans_rows",
    "coactivation_fraction", "max_length", "batch_size", "seed", "ffn_modules", "threads",
)


@split.command("moe")
@click.argument("model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--calib", multiple=True, required=True,
              help="Calibration text: .txt/.jsonl/.csv file, directory, folders:DIR, bbc[:train|validation|test], "
                   "or hf:NAME[@CONFIG][:SPLIT[:COLUMN]] (online). Repeat to combine.")
@click.option("--eval", "eval_data", multiple=True,
              help="Held-out text for the report (same forms as --calib; default: 10 % of --calib held out).")
@click.option("--text-column", help="Column holding the text in .jsonl/.csv files.")
@click.option("--eval-texts", default=200, show_default=True, type=click.IntRange(min=1),
              help="Held-out texts scored (encoders).")
@click.option("--eval-tokens", default=8192, show_default=True, type=click.IntRange(min=16),
              help="Held-out tokens scored (decoders: perplexity).")
@click.option("--compare", is_flag=True, help="Also fit the other two partitions for the report (three fits).")
@click.option("--no-report", is_flag=True, help="Skip the quality sweeps and the report (faster).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@analyser_options(_moe_table(), MOE_OPTIONS)
@reports_errors
def moe(model: str, out_dir: str, calib: tuple[str, ...], eval_data: tuple[str, ...], text_column: str | None,
        eval_texts: int, eval_tokens: int, compare: bool, no_report: bool, force: bool, quiet: bool,
        **params: Any) -> None:
    """Split every FFN of MODEL into experts with routers (MoE-fication) and write OUT_DIR: the same dense
    checkpoint with FFN neurons in expert order (transformers still loads it), routers and partition
    (experts.safetensors, experts.json, module.json) and report.html.

    Run it with posthoc.load(OUT_DIR, top_k=K)."""
    from posthoc.analyse.calibration import load_calibration
    from posthoc.analyse.moe.run import moefy

    held_out = load_calibration(list(eval_data), text_column=text_column) if eval_data else None
    result = moefy(model, out_dir, list(calib), eval_data=held_out, eval_texts=eval_texts, eval_tokens=eval_tokens,
                   compare=compare, report=not no_report, force=force, text_column=text_column,
                   progress=not quiet, **params)
    moe = result.moe
    click.echo(f"wrote {result.out_dir}: {len(moe.ffns_)} FFNs x {moe.experts} experts, top-{moe.top_k} "
               f"({moe.partition} partition, {moe.router} router), calibrated on {moe.tokens_:,} tokens "
               f"in {result.summary['seconds']:.0f} s")
    fitted = result.summary.get("fitted")
    if fitted:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in fitted.items() if isinstance(v, float) and k not in ("fraction",))
        dense = ", ".join(f"{k} {v:.4g}" for k, v in result.dense.items())
        click.echo(f"held-out: dense {dense}; MoE {scores}")
    for s in result.summary.get("speed") or []:
        click.echo(f"FFN speed at top-{s['top_k']}/{s['experts']}: {s['dense_ms']:.1f} ms dense, {s['moe_ms']:.1f} ms MoE "
                   f"({s['speedup']:.2f}x, {s['tokens']} tokens)")
    if not no_report:
        click.echo(f"report: {result.out_dir / 'report.html'}")
