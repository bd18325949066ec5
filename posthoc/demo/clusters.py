"""The README demo's cluster step: is the base encoder modular, and which neuron clusters track which topic?

    from posthoc.demo.clusters import demo_step      # a DemoStep: demo_step(context) -> str

The base encoder's FFN neurons (all-MiniLM-L6-v2 in the real demo: 6 FFNs × 1536 neurons) are joined by
the |correlation| of their activations on the demo's train texts (both tasks), cut into K = 8 communities
per FFN by spectral clustering, and each FFN's graph is scored (n-cut, modularity Q) against 20 copies of
itself whose activations were permuted across tokens (Filan et al. / Hod et al.'s shuffle test): an FFN is
called modular only when it beats all 20 (p <= 1/21). Each cluster's mean |activation| on a train text
is then ranked against each topic (average precision; a random ranking scores the topic's prevalence).

The full output of `posthoc split cluster` (report.html, clusters.json, GraphML graphs, one `mask` module
per cluster) is written to `work_dir/clusters/output` and reused on the next run when the base, the texts
and the settings match, unless `fresh`. No ablations here (they take minutes on CPU): see
`posthoc split cluster --labels` and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from posthoc.analyse.cluster.clusterer import NeuronClusterer
from posthoc.analyse.cluster.run import write_cluster_output
from posthoc.demo.context import DemoContext, texts_digest

# What decides the cached output (with the base model and the texts).
SETTINGS: dict[str, Any] = {
    "graph": "correlation", "method": "spectral", "n_clusters": 8, "shuffles": 20,
    "max_tokens": 6_000, "shuffle_tokens": 1024, "max_label_texts": 150, "ablate": False, "seed": 0,
}
RECORD = "demo.json"
TOP = 3  # cluster-topic associations shown (the strongest, one per topic)


def _train_texts(context: DemoContext) -> tuple[list[str], list[str]]:
    """Every task's train texts with their topic names (the tasks' classes are disjoint topics)."""
    texts, labels = [], []
    for split in context.splits.values():
        texts += list(split.train.texts)
        labels += [split.train.label_names[y] for y in split.train.labels]
    return texts, labels


def _fit_cached(context: DemoContext) -> tuple[Path, dict[str, Any], float | None]:
    """(output dir, clusters.json, seconds to fit or None when reused)."""
    root = context.work_dir / "clusters"
    out, record_path = root / "output", root / RECORD
    texts, labels = _train_texts(context)
    params = {**SETTINGS, "max_length": context.settings.finetune.max_length}
    key = {"base_model": str(Path(context.base_dir).resolve()), "texts": texts_digest(texts, labels), "params": params}
    if (not context.fresh and record_path.is_file() and (out / "clusters.json").is_file()
            and json.loads(record_path.read_text()).get("key") == key):
        return out, json.loads((out / "clusters.json").read_text()), None
    root.mkdir(parents=True, exist_ok=True)
    record_path.unlink(missing_ok=True)
    started = time.perf_counter()
    clusterer = NeuronClusterer(**params, progress=context.progress, threads=context.threads).fit(
        str(context.base_dir), texts, labels=labels)
    write_cluster_output(clusterer, out, force=True)
    seconds = time.perf_counter() - started
    record_path.write_text(json.dumps({"key": key, "seconds": round(seconds, 1)}, indent=2) + "\n")
    return out, json.loads((out / "clusters.json").read_text()), seconds


def _z(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:+.0f}" if abs(value) >= 10 else f"{value:+.1f}"


def summarise(summary: dict[str, Any], report: Path, seconds: float | None) -> str:
    """The demo's text block from a clusters.json summary (see NeuronClusterer.summary)."""
    p = summary["params"]
    units = summary["units"]
    modular = [u["unit"] for u in units if u["modular"]]
    lines = [
        f"Neuron clusters of the base encoder (|correlation| of FFN activations on {summary['tokens']:,} train tokens, "
        f"spectral K = {p['n_clusters']}, vs {p['shuffles']} token shuffles; "
        + ("reused from the cache" if seconds is None else f"{seconds:.0f} s") + "):",
    ]
    for u in units:
        cut, q = u["n-cut"], u["Q"]
        lines.append(f"  {u['unit']}: n-cut {cut['real']:.2f} vs shuffled {cut['shuffled_mean']:.2f} (z {_z(cut['z'])}), "
                     f"Q {q['real']:.3f} vs {q['shuffled_mean']:.3f} (z {_z(q['z'])})"
                     + {True: "  modular", False: "  not modular", None: ""}[u["modular"]])
    lines.append(f"  {len(modular)} of {len(units)} FFNs are more modular than all {p['shuffles']} of their shuffles.")
    function = summary.get("function")
    if function:
        sizes = {c["id"]: c["size"] for c in summary["clusters"]}
        prevalence = function["prevalence"]
        scored = sorted(((ap[k] / prevalence[k], cid, k) for cid, ap in function["average_precision"].items()
                         for k in range(len(prevalence)) if ap[k] is not None), reverse=True)
        shown: list[str] = []
        for _lift, cid, k in scored:
            topic = function["labels"][k]
            if topic in shown:
                continue
            shown.append(topic)
            ap = function["average_precision"][cid][k]
            lines.append(f"  {'Top clusters by topic:' if len(shown) == 1 else ' ' * 22} {cid} ({sizes[cid]} neurons) "
                         f"tracks {topic}: average precision {ap:.2f} vs {prevalence[k]:.2f} by chance")
            if len(shown) == TOP:
                break
    lines.append(f"  Report: {report}")
    return "\n".join(lines)


def demo_step(context: DemoContext) -> str:
    """Cluster the base encoder's FFN neurons on the train texts; return the demo's text block."""
    out, summary, seconds = _fit_cached(context)
    return summarise(summary, out / "report.html", seconds)
