"""`posthoc split cluster`: fit a NeuronClusterer, write its report, graphs and cluster modules.

    OUT_DIR/report.html (+ PNGs)   is the model modular (vs shuffles), which clusters track which labels,
                                   what ablating them costs
    OUT_DIR/clusters.json          everything measured (NeuronClusterer.summary())
    OUT_DIR/graphs/FFN_<l>.graphml the neuron graph with each node's cluster (strongest edges), for Gephi
    OUT_DIR/modules/<id>/          one `mask` module per cluster (1 = member neuron): apply it with
                                   `posthoc stack MODEL OUT --module DIR --mask-mode keep|remove`,
                                   posthoc.load(DIR, mode=...) or posthoc.modules.masks.apply_mask(model, DIR, out, mode=...)

Written into a temporary directory next to OUT_DIR and renamed at the end.
"""

from __future__ import annotations

import math

import numpy as np

from posthoc.analyse.cluster.clusterer import NeuronClusterer
from posthoc.report import Report

EXPORT_EDGE_FRACTION = 0.02  # GraphML files keep the strongest 2 % of edges (a dense FFN graph has ~10^6)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def _pct(fraction: float) -> str:
    return "–" if not math.isfinite(fraction) else f"{100 * fraction:.0f} %"


def verdict(c: NeuronClusterer) -> str:
    """One sentence: how many units beat their shuffles."""
    tested = [u for u in c.units_ if u.modular is not None]
    if not tested:
        return "No shuffles were run, so no unit is called modular or not (shuffles=0)."
    modular = [u for u in tested if u.modular]
    score = c.units_[0].primary
    return (f"{len(modular)} of {len(tested)} units are more modular than all {c.shuffles} of their shuffles "
            f"({score}, p <= {1 / (c.shuffles + 1):.3f}): "
            + (", ".join(u.name for u in modular) if modular else "none") + ".")


def cluster_report(c: NeuronClusterer) -> Report:
    """The report of a fitted clusterer: modularity against shuffles, clusters, label ties, ablations, cost."""
    report = Report(
        f"Neuron clusters of {c.source_ or 'the model'}",
        f"{c.graph} graph, {c.method} clustering"
        + (f" to K = {c.n_clusters}" if c.method == "spectral" else "")
        + f", {c.shuffles} shuffles" + (", adjacent FFNs together" if c.across_layers else ""),
    )
    _modularity(report, c)
    _clusters(report, c)
    if c.function_ is not None:
        _function(report, c)
    if c.ablation_:
        _ablation(report, c)
    report.section("Cost")
    report.key_values({k: f"{v:.1f} s" for k, v in c.timings_.items()})
    return report


def _modularity(report: Report, c: NeuronClusterer) -> None:
    shuffle_kind = "weights permuted within each matrix" if c.graph == "weights" else "activations permuted across tokens"
    report.section("Is it modular?", verdict(c))
    report.paragraph(
        f"Each graph is compared with {c.shuffles} shuffled copies ({shuffle_kind}), clustered the same way. "
        "Q (modularity): higher is more modular; n-cut (normalised cut): lower is more modular. z = (real − mean of "
        "shuffles) / their std; percentile = % of shuffles the real graph is more modular than."
    )
    rows = []
    for u in c.units_:
        rows.append([u.name, u.graph.size, len(np.unique(u.labels)), u.q.real, f"{_fmt(u.q.mean)} ± {_fmt(u.q.std, 2)}",
                     _fmt(u.q.z, 3), _pct(u.q.beats), u.ncut.real, f"{_fmt(u.ncut.mean)} ± {_fmt(u.ncut.std, 2)}",
                     _fmt(u.ncut.z, 3), _pct(u.ncut.beats), {True: "yes", False: "no", None: "–"}[u.modular]])
    report.table(["unit", "nodes", "communities", "Q", "Q shuffled", "z(Q)", "percentile", "n-cut", "n-cut shuffled",
                  "z(n-cut)", "percentile", "modular"], rows, floatfmt=".4f",
                 caption=f"Tokens: {c.tokens_ or 'none (weights only)'}.")
    if c.shuffles > 1:
        fig, axes = report.figure_axes(width=9, height=3.4, ncols=2)
        for ax, key in zip(axes, ("q", "ncut")):
            for i, u in enumerate(c.units_):
                test = getattr(u, key)
                ax.scatter(np.full(len(test.shuffled), i) + np.linspace(-0.15, 0.15, len(test.shuffled)),
                           test.shuffled, s=8, color="#999", label="shuffles" if i == 0 else None)
                ax.scatter([i], [test.real], s=40, color="#d62728", marker="D", label="model" if i == 0 else None)
            ax.set_xticks(range(len(c.units_)), [u.name.replace("FFN ", "") for u in c.units_])
            ax.set_xlabel("FFN")
            ax.set_title("modularity Q (higher: more modular)" if key == "q" else "n-cut (lower: more modular)")
            ax.legend(fontsize=8)
        report.figure(fig, "shuffles", "Each FFN's graph (red) against its shuffles (grey).")


def _clusters(report: Report, c: NeuronClusterer) -> None:
    report.section("Clusters")
    sizes = {}
    for cl in c.clusters_:
        sizes.setdefault(c.units_[cl.unit].name, []).append(cl.size)
    report.table(["unit", "clusters", "sizes (neurons)"],
                 [[name, len(s), ", ".join(str(v) for v in sorted(s, reverse=True))] for name, s in sizes.items()])


def _function(report: Report, c: NeuronClusterer) -> None:
    report.section("Which clusters track which labels", (
        f"Labelled texts: {c.labels_source_}. A cluster's activation on a text is the mean |h| of its neurons over "
        "the text's tokens; its average precision (AP) for a label ranks the texts by that activation. A random "
        "ranking has AP = the label's prevalence; lift = AP / prevalence."))
    lift = c.function_ / c.prevalence_[None, :]
    order = np.argsort(-lift.max(1))
    top = [i for i in order[:20]]
    report.table(["cluster", "size", "best label", "AP", "prevalence", "lift", "2nd label", "AP"],
                 [[c.clusters_[i].id, c.clusters_[i].size, c.label_names_[int(np.argmax(lift[i]))],
                   float(c.function_[i, int(np.argmax(lift[i]))]), float(c.prevalence_[int(np.argmax(lift[i]))]),
                   float(lift[i].max()), c.label_names_[int(np.argsort(-lift[i])[1])],
                   float(c.function_[i, int(np.argsort(-lift[i])[1])])] for i in top],
                 caption=f"The {len(top)} clusters with the largest lift, of {len(c.clusters_)}.")
    fig, ax = report.figure_axes(width=7, height=max(2.5, 0.18 * len(c.clusters_) + 1))
    image = ax.imshow(lift, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(c.label_names_)), c.label_names_, rotation=30, ha="right")
    ax.set_yticks(range(len(c.clusters_)), [cl.id for cl in c.clusters_], fontsize=6)
    fig.colorbar(image, ax=ax, label="AP / prevalence")
    report.figure(fig, "function", "Lift of every cluster (rows) for every label (columns).")


def _ablation(report: Report, c: NeuronClusterer) -> None:
    report.section("What ablating a cluster costs", (
        f"A linear probe trained on the full model's embeddings of {c.probe_texts_} labelled texts is read on "
        f"{c.eval_texts_} others with the cluster's neurons zeroed, and with {c.ablation_baselines} random sets of "
        f"the same size in the same FFNs. Full-model accuracy {c.full_accuracy_:.4f}, loss {c.full_loss_:.4f}."))
    ranked = sorted(c.ablation_, key=lambda r: (-r["drop"], -r["loss_increase"]))
    report.table(["cluster", "size", "accuracy", "drop", "random drop", "z", "loss increase", "random increase",
                  "z (loss)"],
                 [[r["cluster"], r["size"], r["accuracy"], r["drop"],
                   f"{_fmt(r['random_mean'], 3)} ± {_fmt(r['random_std'], 2)}", _fmt(r["z"], 3),
                   r["loss_increase"], f"{_fmt(r['random_loss_mean'], 3)} ± {_fmt(r['random_loss_std'], 2)}",
                   _fmt(r["z_loss"], 3)] for r in ranked[:20]],
                 caption=f"The {min(20, len(ranked))} most costly clusters, of {len(ranked)}.")
    fig, ax = report.figure_axes(width=8, height=3.4)
    x = np.arange(len(c.ablation_))
    ax.bar(x - 0.2, [r["drop"] for r in c.ablation_], width=0.4, label="cluster ablated")
    ax.bar(x + 0.2, [r["random_mean"] for r in c.ablation_], width=0.4,
           yerr=[0 if not math.isfinite(r["random_std"]) else r["random_std"] for r in c.ablation_],
           label="random set, same size", color="#bbb")
    ax.set_xticks(x, [r["cluster"] for r in c.ablation_], rotation=90, fontsize=6)
    ax.set_ylabel("accuracy drop")
    ax.legend(fontsize=8)
    report.figure(fig, "ablation", "Accuracy drop of the probe with each cluster ablated, vs random neuron sets.")


