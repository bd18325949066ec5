"""`posthoc split cluster` and `posthoc split mask`: find functional modules inside a dense model."""

from __future__ import annotations

import click
from posthoc.cli.main import reports_errors

from posthoc.analyse.cluster import GRAPHS
from posthoc.analyse.graphs import METHODS
from posthoc.analyse.masks import GRANULARITIES

try:
    from posthoc.cli.split import split
except ImportError:  # the `split` group (MoE-fication) is not installed: make the group here
    from posthoc.cli.main import main

    @main.group()
    def split() -> None:
        """Find modules inside a trained dense transformer."""


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
@click.option("--graph", type=click.Choice(GRAPHS), default="weights", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="spectral", show_default=True)
@click.option("-k", "--clusters", "n_clusters", type=int, default=8, show_default=True, help="K for spectral clustering.")
@click.option("--shuffles", type=int, default=20, show_default=True, help="Shuffled baselines per graph.")
@click.option("--layers", help="FFN indices to analyse, e.g. 0,1,2 (default: all).")
@click.option("--across-layers", is_flag=True, help="Cluster pairs of adjacent FFNs together.")
@click.option("--edge-fraction", type=float, help="Keep this fraction of the strongest edges (default: auto).")
@click.option("--max-tokens", type=int, default=50_000, show_default=True, help="Calibration tokens streamed.")
@click.option("--max-label-texts", type=int, default=250, show_default=True)
@click.option("--baselines", "ablation_baselines", type=int, default=3, show_default=True,
              help="Random neuron sets ablated per cluster.")
@click.option("--no-ablation", is_flag=True, help="Skip cluster ablations.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ffn-modules", help="'up=PATTERN,down=PATTERN[,gate=PATTERN][,act=NAME]' for unknown models.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_errors
def cluster(model: str, out_dir: str, calib: str | None, labels: str | None, label_file: str | None, graph: str,
            method: str, n_clusters: int, shuffles: int, layers: str | None, across_layers: bool,
            edge_fraction: float | None, max_tokens: int, max_label_texts: int, ablation_baselines: int,
            no_ablation: bool, seed: int, ffn_modules: str | None, force: bool, quiet: bool) -> None:
    """Cluster MODEL's FFN neurons, test the clusters against shuffled graphs, tie them to labels, and write
    a report, GraphML graphs and one mask module per cluster to OUT_DIR."""
    from posthoc.analyse.cluster_report import split_cluster, verdict

    if labels and label_file:
        raise click.UsageError("give --labels or --label-file, not both")
    if label_file:
        with open(label_file, encoding="utf-8") as f:
            labels_arg = [line.strip() for line in f if line.strip()]
    else:
        labels_arg = labels
    result = split_cluster(
        model, out_dir, calib, labels=labels_arg, force=force, graph=graph, method=method, n_clusters=n_clusters,
        shuffles=shuffles, layers=_layers(layers), across_layers=across_layers,
        edge_fraction="auto" if edge_fraction is None else edge_fraction, max_tokens=max_tokens,
        max_label_texts=max_label_texts, ablation_baselines=ablation_baselines, ablate=not no_ablation, seed=seed,
        ffn_modules=ffn_modules, progress=not quiet,
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
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="weight", show_default=True)
@click.option("--alpha", type=float, help="Weight of the density term per kept entry, > 0 (default: 5e-5 for weights, 5e-4 for neurons).")
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--train-per-class", type=int, default=100, show_default=True, help="Training texts per class.")
@click.option("--test-per-class", type=int, default=50, show_default=True, help="Held-out texts per class.")
@click.option("--pruned", is_flag=True, help="Also write each task's pruned checkpoint (OUT_DIR/pruned/TASK).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ffn-modules", help="'up=PATTERN,down=PATTERN[,gate=PATTERN][,act=NAME]' for unknown models.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_errors
def mask(model: str, out_dir: str, tasks: tuple[str, ...], granularity: str, alpha: float | None, steps: int, lr: float,
         batch_size: int, max_length: int, train_per_class: int, test_per_class: int, pruned: bool, seed: int,
         ffn_modules: str | None, force: bool, quiet: bool) -> None:
    """Learn a binary mask over MODEL's frozen weights per task; write masks (mask modules), their
    masked/inverted scores and IoU, and a report to OUT_DIR."""
    from posthoc.analyse.mask_report import parse_task, split_mask

    parsed = [parse_task(t, train_per_class=train_per_class, test_per_class=test_per_class, seed=seed) for t in tasks]
    results = split_mask(
        model, out_dir, parsed, force=force, pruned=pruned, progress=not quiet, granularity=granularity, alpha=alpha,
        steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed, ffn_modules=ffn_modules,
    )
    for r in results:
        s = r.scores
        click.echo(f"{r.task.name}: density {r.masker.density_:.4f}, {r.masker.metric_} full {s['full']:.4f}, "
                   f"masked {s['mask']:.4f}, inverted {s['inverted']:.4f}, random {s['random']:.4f}")
    click.echo(f"wrote {out_dir}")
