"""`posthoc split cluster` and `posthoc split mask`: find functional modules inside a dense model."""

from __future__ import annotations

from typing import Any

import click

from posthoc.analyse.cluster.clusterer import PARAMS as CLUSTER_PARAMS
from posthoc.analyse.masks.masker import PARAMS as MASK_PARAMS

from .main import reports_errors
from .split import analyser_options, split

# Options generated from the analysers' parameter tables (defaults, help and checks declared once there).
CLUSTER_OPTIONS = (
    "graph", "method", "n_clusters", "resolution", "shuffles", "shuffle_tokens", "top_fraction", "across_layers",
    "max_tokens", "max_length", "batch_size", "max_label_texts", "ablation_baselines", "ablate", "seed", "ffn_modules",
    "threads",
)
MASK_OPTIONS = (
    "granularity", "steps", "batch_size", "lr", "init_logit", "temperature", "max_length", "seed", "ffn_modules",
    "threads",
)


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of FFN indices") from None


@split.command("cluster")
@click.argument("model")
@click.argument("out_dir")
@click.option("--calib", help="Calibration texts (file, DIR, folders:DIR, bbc[:train|validation|test]); "
              "needed for activation graphs.")
@click.option("--labels", help="Labelled texts (e.g. bbc:test, folders:DIR) to tie clusters to labels and ablate them.")
@click.option("--label-file", type=click.Path(exists=True, dir_okay=False),
              help="Instead of --labels: one label per line for the --calib texts, in order.")
@click.option("--layers", help="FFN indices to analyse, e.g. 0,1,2 (default: all).")
@click.option("--edge-fraction", type=float, help=CLUSTER_PARAMS["edge_fraction"].help)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@analyser_options(CLUSTER_PARAMS, CLUSTER_OPTIONS)
@reports_errors
def cluster(model: str, out_dir: str, calib: str | None, labels: str | None, label_file: str | None,
            layers: str | None, edge_fraction: float | None, force: bool, quiet: bool, **params: Any) -> None:
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
    result = split_cluster(
        model, out_dir, calib, labels=labels_arg, force=force, layers=_layers(layers),
        edge_fraction="auto" if edge_fraction is None else edge_fraction, progress=not quiet, **params,
    )
    click.echo(verdict(result))
    click.echo(f"wrote {out_dir}: {len(result.clusters_)} clusters, report.html, "
               f"{result.timings_['total']:.1f} s")


@split.command("mask")
@click.argument("model")
@click.argument("out_dir")
@click.option("--task", "tasks", multiple=True, required=True, metavar="DATA[:CLASS,CLASS]",
              help="A task (repeat for several): labelled data, optionally some of its classes (bbc:sport,tech), "
              "or plain texts (a causal LM's language-model loss).")
@click.option("--alpha", type=float, help=MASK_PARAMS["alpha"].help)
@click.option("--head", type=click.Path(exists=True, file_okay=False), help=MASK_PARAMS["head"].help)
@click.option("--train-per-class", type=int, default=100, show_default=True, help="Training texts per class.")
@click.option("--test-per-class", type=int, default=50, show_default=True, help="Held-out texts per class.")
@click.option("--pruned", is_flag=True, help="Also write each task's pruned checkpoint (OUT_DIR/pruned/TASK).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@analyser_options(MASK_PARAMS, MASK_OPTIONS)
@reports_errors
def mask(model: str, out_dir: str, tasks: tuple[str, ...], alpha: float | None, head: str | None, train_per_class: int,
         test_per_class: int, pruned: bool, force: bool, quiet: bool, **params: Any) -> None:
    """Learn a binary mask over MODEL's frozen weights per task; write masks (mask modules), their
    masked/inverted scores and IoU, and a report to OUT_DIR."""
    from posthoc.analyse.masks.run import parse_task, split_mask

    parsed = [parse_task(t, train_per_class=train_per_class, test_per_class=test_per_class, seed=params["seed"])
              for t in tasks]
    results = split_mask(model, out_dir, parsed, force=force, pruned=pruned, progress=not quiet, alpha=alpha, head=head,
                         **params)
    for r in results:
        s = r.scores
        click.echo(f"{r.task.name}: density {r.masker.density_:.4f}, {r.masker.metric_} full {s['full']:.4f}, "
                   f"masked {s['mask']:.4f}, inverted {s['inverted']:.4f}, random {s['random']:.4f}")
    click.echo(f"wrote {out_dir}")
