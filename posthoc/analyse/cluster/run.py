"""`posthoc split cluster`: fit the clusterer, write its report, graphs and one mask module per cluster."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posthoc.analyse.cluster.clusterer import NeuronClusterer
from posthoc.analyse.cluster.graphs import sparsify, to_networkx
from posthoc.analyse.cluster.report import EXPORT_EDGE_FRACTION, cluster_report
from posthoc.checkpoint import check_output_location, open_checkpoint
from posthoc.ffn import FFN
from posthoc.modules.format import BaseRef
from posthoc.modules.masks import neuron_entries, neuron_mask_name, staged_output, write_mask_module
from posthoc.report import Report


def write_cluster_output(c: NeuronClusterer, out_dir: str | os.PathLike[str], *, force: bool = False,
                         graphml: bool = True, modules: bool = True, report: Report | None = None) -> Path:
    """Write report, clusters.json, GraphML files and one mask module per cluster (see the module docstring)."""
    c.check_fitted()
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
                        member = np.zeros(ffn.modules(c.model_)[2].in_features, dtype=bool)
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
    check_output_location(Path(out_dir), [Path(model)] if isinstance(model, (str, os.PathLike)) else [], force)
    started = time.perf_counter()
    clusterer = NeuronClusterer(**params).fit(model, calib, labels=labels)
    write_cluster_output(clusterer, out_dir, force=force)
    clusterer.timings_["total_with_output"] = time.perf_counter() - started
    return clusterer


def _ffn_of(c: NeuronClusterer, layer: int) -> FFN:
    return next(f for f in c.ffns_ if f.index == layer)
