"""`posthoc split cluster`: fit a NeuronClusterer, write its report, graphs and cluster modules.

    OUT_DIR/report.html (+ PNGs)   is the model modular (vs shuffles), which clusters track which labels,
                                   what ablating them costs
    OUT_DIR/clusters.json          everything measured (NeuronClusterer.summary())
    OUT_DIR/graphs/FFN_<l>.graphml the neuron graph with each node's cluster (strongest edges), for Gephi
    OUT_DIR/modules/<id>/          one `mask` module per cluster (1 = member neuron): apply it with
                                   `posthoc stack MODEL OUT --module DIR --mask-mode keep|remove`,
                                   posthoc.load(DIR, mode=...) or maskmodule.apply_mask(model, DIR, out, mode=...)

Written into a temporary directory next to OUT_DIR and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posthoc.analyse.cluster import NeuronClusterer
from posthoc.analyse.ffn import FFN
from posthoc.analyse.graphs import sparsify, to_networkx
from posthoc.analyse.maskmodule import neuron_entries, neuron_mask_name, staged_output, write_mask_module
from posthoc.checkpoint import open_checkpoint
from posthoc.modules.format import BaseRef
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
    report = Report(
        f"Neuron clusters of {c.source_ or 'the model'}",
        f"{c.graph} graph, {c.method} clustering"
        + (f" to K = {c.n_clusters}" if c.method == "spectral" else "")
        + f", {c.shuffles} shuffles" + (", adjacent FFNs together" if c.across_layers else ""),
    )
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

    report.section("Clusters")
    sizes = {}
    for cl in c.clusters_:
        sizes.setdefault(c.units_[cl.unit].name, []).append(cl.size)
    report.table(["unit", "clusters", "sizes (neurons)"],
                 [[name, len(s), ", ".join(str(v) for v in sorted(s, reverse=True))] for name, s in sizes.items()])

    if c.function_ is not None:
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

    if c.ablation_:
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

    report.section("Cost")
    report.key_values({k: f"{v:.1f} s" for k, v in c.timings_.items()})
    return report


def _ffn_of(c: NeuronClusterer, layer: int) -> FFN:
    return next(f for f in c.ffns_ if f.index == layer)


def write_cluster_output(c: NeuronClusterer, out_dir: str | os.PathLike[str], *, force: bool = False,
                         graphml: bool = True, modules: bool = True, report: Report | None = None) -> Path:
    """Write report, clusters.json, GraphML files and one mask module per cluster (see the module docstring)."""
    c._fitted()
    protect = [Path(c.source_)] if c.source_ else []
    with staged_output(out_dir, protect=protect, force=force) as staging:
        (staging / "clusters.json").write_text(json.dumps(_jsonable(c.summary()), indent=1) + "\n")
        if graphml:
            import networkx as nx

            (staging / "graphs").mkdir()
            for u in c.units_:
                adjacency = sparsify(u.graph.adjacency, EXPORT_EDGE_FRACTION)
                g = to_networkx(adjacency, u.graph, u.labels)
                nx.write_graphml(g, staging / "graphs" / f"{u.name.replace(' ', '_').replace('+', '-')}.graphml")
        if modules and c.source_ is not None:
            with open_checkpoint(c.source_) as base:
                base_ref = BaseRef.of(base)
                for cl in c.clusters_:
                    masks, entries = {}, {}
                    for layer, idx in cl.neurons.items():
                        ffn = _ffn_of(c, layer)
                        member = np.zeros(ffn.modules(c._model)[2].in_features, dtype=bool)
                        member[idx] = True
                        masks[neuron_mask_name(layer)] = torch.from_numpy(member)
                        entries.update(neuron_entries(ffn, base))
                    write_mask_module(
                        staging / "modules" / cl.id, base, masks, entries, base_ref=base_ref,
                        tags={"analysis": "cluster", "granularity": "neuron", "cluster": cl.id, "ones": "member",
                              "graph": c.graph, "method": c.method},
                        provenance={"size": cl.size, "unit": c.units_[cl.unit].name,
                                    "apply": "mode keep: only this cluster's neurons in its FFNs; remove: ablate it"},
                    )
        (report or cluster_report(c)).write(staging)
    return Path(out_dir)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def split_cluster(model: Any, out_dir: str | os.PathLike[str], calib: Any = None, *, labels: Any = None,
                  force: bool = False, **params: Any) -> NeuronClusterer:
    """The whole command: check the output location, fit, write. Returns the fitted clusterer."""
    from posthoc.checkpoint import check_output_location

    check_output_location(Path(out_dir), [Path(model)] if isinstance(model, (str, os.PathLike)) else [], force)
    started = time.perf_counter()
    clusterer = NeuronClusterer(**params).fit(model, calib, labels=labels)
    write_cluster_output(clusterer, out_dir, force=force)
    clusterer.timings_["total_with_output"] = time.perf_counter() - started
    return clusterer


def demo_cluster_step(model: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, shuffles: int = 20,
                      force: bool = False, progress: bool = True) -> str:
    """The README demo's cluster step: every FFN's weight graph, spectral K = 8, against `shuffles` weight
    shuffles (no calibration text, no labels). Writes the full output to `out_dir`; returns one line per FFN."""
    c = split_cluster(model, out_dir, None, force=force, shuffles=shuffles, progress=progress)
    lines = [verdict(c)]
    for u in c.units_:
        lines.append(f"  {u.name}: n-cut {u.ncut.real:.3f} vs shuffled {u.ncut.mean:.3f} ± {u.ncut.std:.3f} "
                     f"(z {u.ncut.z:+.1f}), Q {u.q.real:.4f} vs {u.q.mean:.4f} (z {u.q.z:+.1f})")
    return "\n".join(lines)
