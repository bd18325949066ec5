"""`posthoc split moe|cluster|mask`: find modules inside a trained dense model. Each analyser is one subcommand:

    @split.command("NAME")
    @click.option(...)                      # the command's own options (data, output, --force, --quiet)
    @analyser_options(Analyser.PARAMS)      # one option per parameter of the analyser's table
    @reports_errors
    def name(...): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from posthoc.analyse.cluster.clusterer import NeuronClusterer
from posthoc.analyse.masks.masker import SubnetworkMasker
from posthoc.analyse.moe.moefier import MoEfier
from posthoc.analyse.params import Param, ParamTable, Text

from .main import main, reports_errors

CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


@main.group()
def split() -> None:
    """Find modules inside a trained dense model (MoE-fication into experts, …)."""


class TextType(click.ParamType):
    """A click type from a parameter table's `Text` (its parse function and metavar)."""

    def __init__(self, text: Text):
        self.text = text
        self.name = text.metavar.lower()  # click shows NAME.upper() as the metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.text.parse(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def option_for(p: Param) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one table parameter: --name (underscores as dashes), its type, default and help."""
    flag = "--" + p.name.replace("_", "-")
    if p.type is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", p.name, default=p.default, show_default=True, help=p.help)
    if p.choices:
        return click.option(flag, p.name, type=click.Choice(p.choices), default=p.default, show_default=True,
                            help=p.help)
    kind = TextType(p.type) if isinstance(p.type, Text) else CLICK_TYPES[p.type]
    # a number default is shown; None, or a word such as 'auto', is explained by the help
    show = isinstance(p.default, (int, float)) and not isinstance(p.default, bool)
    return click.option(flag, p.name, type=kind, default=p.default, show_default=show, help=p.help)


def analyser_options(table: ParamTable) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One click option per command-line parameter of an analyser's table, in the table's order."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for p in reversed([p for p in table if p.cli]):
            fn = option_for(p)(fn)
        return fn

    return decorate


# ------------------------------------------------------------------------------------------------ moe


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
@analyser_options(MoEfier.PARAMS)
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


# -------------------------------------------------------------------------------------------- cluster


@split.command("cluster")
@click.argument("model")
@click.argument("out_dir")
@click.option("--calib", help="Calibration texts (file, DIR, folders:DIR, bbc[:train|validation|test]); "
              "needed for activation graphs.")
@click.option("--labels", help="Labelled texts (e.g. bbc:test, folders:DIR) to tie clusters to labels and ablate them.")
@click.option("--label-file", type=click.Path(exists=True, dir_okay=False),
              help="Instead of --labels: one label per line for the --calib texts, in order.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@analyser_options(NeuronClusterer.PARAMS)
@reports_errors
def cluster(model: str, out_dir: str, calib: str | None, labels: str | None, label_file: str | None, force: bool,
            quiet: bool, **params: Any) -> None:
    """Cluster MODEL's FFN neurons, test the clusters against shuffled graphs, tie them to labels, and write
    a report, GraphML graphs and one mask module per cluster to OUT_DIR."""
    from posthoc.analyse.cluster.report import verdict
    from posthoc.analyse.cluster.run import split_cluster

    if labels and label_file:
        raise click.UsageError("give --labels or --label-file, not both")
    if label_file:
        with open(label_file, encoding="utf-8") as f:
            labels_arg = [line.strip() for line in f if line.strip()]
    else:
        labels_arg = labels
    result = split_cluster(model, out_dir, calib, labels=labels_arg, force=force, progress=not quiet, **params)
    click.echo(verdict(result))
    click.echo(f"wrote {out_dir}: {len(result.clusters_)} clusters, report.html, "
               f"{result.timings_['total']:.1f} s")


# ----------------------------------------------------------------------------------------------- mask


@split.command("mask")
@click.argument("model")
@click.argument("out_dir")
@click.option("--task", "tasks", multiple=True, required=True, metavar="DATA[:CLASS,CLASS]",
              help="A task (repeat for several): labelled data, optionally some of its classes (bbc:sport,tech), "
              "or plain texts (a causal LM's language-model loss).")
@click.option("--train-per-class", type=int, default=100, show_default=True, help="Training texts per class.")
@click.option("--test-per-class", type=int, default=50, show_default=True, help="Held-out texts per class.")
@click.option("--pruned", is_flag=True, help="Also write each task's pruned checkpoint (OUT_DIR/pruned/TASK).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@analyser_options(SubnetworkMasker.PARAMS)
@reports_errors
def mask(model: str, out_dir: str, tasks: tuple[str, ...], train_per_class: int, test_per_class: int, pruned: bool,
         force: bool, quiet: bool, **params: Any) -> None:
    """Learn a binary mask over MODEL's frozen weights per task; write masks (mask modules), their
    masked/inverted scores and IoU, and a report to OUT_DIR."""
    from posthoc.analyse.masks.run import parse_task, split_mask

    parsed = [parse_task(t, train_per_class=train_per_class, test_per_class=test_per_class, seed=params["seed"])
              for t in tasks]
    results = split_mask(model, out_dir, parsed, force=force, pruned=pruned, progress=not quiet, **params)
    for r in results:
        s = r.scores
        click.echo(f"{r.task.name}: density {r.masker.density_:.4f}, {r.masker.metric_} full {s['full']:.4f}, "
                   f"masked {s['mask']:.4f}, inverted {s['inverted']:.4f}, random {s['random']:.4f}")
    click.echo(f"wrote {out_dir}")
