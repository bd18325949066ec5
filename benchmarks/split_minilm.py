"""The real proof of `posthoc split cluster` and `posthoc split mask` on all-MiniLM-L6-v2 with BBC News.

    .venv/bin/python benchmarks/split_minilm.py cluster-weights   # |W| graphs, 20 weight shuffles, labels
    .venv/bin/python benchmarks/split_minilm.py cluster-corr      # activation correlation, 20 token shuffles
    .venv/bin/python benchmarks/split_minilm.py mask              # two topic tasks, weight masks, IoU
    .venv/bin/python benchmarks/split_minilm.py all

Outputs (reports, modules, JSON) go to benchmarks/.work/split/<run>/; a Markdown summary of each run is
printed (it is what benchmarks/RESULTS.md quotes). Settings are chosen for 2 shared CPU cores.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from posthoc.analyse.cluster_report import split_cluster, verdict
from posthoc.analyse.mask_report import parse_task, split_mask
from posthoc.assets import minilm_dir

WORK = Path(__file__).resolve().parent / ".work" / "split"
STEPS, ALPHA = 120, 5e-5  # masks: a kept weight must be worth 5e-5 nats of task loss
CLUSTER = {"max_label_texts": 150, "ablation_baselines": 3, "max_length": 64, "n_clusters": 8, "shuffles": 20}


def show_cluster(c, started: float) -> None:
    print(f"\n### {c.graph} graph, {c.method}, K = {c.n_clusters}, {c.shuffles} shuffles "
          f"({time.perf_counter() - started:.0f} s; timings {json.dumps({k: round(v) for k, v in c.timings_.items()})})\n")
    print(verdict(c) + "\n")
    print("| FFN | Q | Q shuffled (mean ± std) | z(Q) | n-cut | n-cut shuffled | z(n-cut) | modular |")
    print("|---|---|---|---|---|---|---|---|")
    for u in c.units_:
        print(f"| {u.name} | {u.q.real:.4f} | {u.q.mean:.4f} ± {u.q.std:.4f} | {u.q.z:+.1f} | {u.ncut.real:.3f} | "
              f"{u.ncut.mean:.3f} ± {u.ncut.std:.3f} | {u.ncut.z:+.1f} | {u.modular} |")
    if c.function_ is not None:
        lift = c.function_ / c.prevalence_[None, :]
        print("\nClusters with the largest lift (AP / prevalence):\n")
        print("| cluster | size | label | AP | prevalence | lift | accuracy drop when ablated | random drop | z |")
        print("|---|---|---|---|---|---|---|---|---|")
        ablation = {r["cluster"]: r for r in c.ablation_}
        for i in np.argsort(-lift.max(1))[:8]:
            k = int(np.argmax(lift[i]))
            r = ablation.get(c.clusters_[i].id, {})
            print(f"| {c.clusters_[i].id} | {c.clusters_[i].size} | {c.label_names_[k]} | {c.function_[i, k]:.3f} | "
                  f"{c.prevalence_[k]:.3f} | {lift[i, k]:.2f} | {r.get('drop', float('nan')):+.3f} | "
                  f"{r.get('random_mean', float('nan')):+.3f} ± {r.get('random_std', float('nan')):.3f} | "
                  f"{r.get('z', float('nan')):+.1f} |")
        if c.ablation_:
            worst = sorted(c.ablation_, key=lambda r: -r["drop"])[:5]
            print(f"\nFull-model probe accuracy {c.full_accuracy_:.3f} on {c.eval_texts_} texts. Most costly ablations: "
                  + "; ".join(f"{r['cluster']} ({r['size']} neurons) −{r['drop']:.3f} vs random "
                              f"−{r['random_mean']:.3f} ± {r['random_std']:.3f}" for r in worst))


def cluster_weights() -> None:
    started = time.perf_counter()
    c = split_cluster(minilm_dir(), WORK / "cluster-weights", None, labels="bbc:test", force=True, **CLUSTER)
    show_cluster(c, started)


def cluster_corr() -> None:
    started = time.perf_counter()
    c = split_cluster(minilm_dir(), WORK / "cluster-corr", "bbc:train", labels="bbc:test", force=True,
                      graph="correlation", max_tokens=20_000, shuffle_tokens=4096, **{**CLUSTER, "ablation_baselines": 2})
    show_cluster(c, started)


def mask() -> None:
    started = time.perf_counter()
    tasks = [parse_task(f"bbc:{classes}", train_per_class=60, test_per_class=40)
             for classes in ("business,entertainment,politics", "sports,tech")]
    results = split_mask(minilm_dir(), WORK / "mask", tasks, force=True, steps=STEPS, batch_size=8, max_length=32,
                         lr=0.1, alpha=ALPHA)
    summary = json.loads((WORK / "mask" / "masks.json").read_text())
    print(f"\n### weight masks, α = {ALPHA:g}, {STEPS} steps of 8 texts × 32 tokens, lr 0.1 "
          f"({time.perf_counter() - started:.0f} s)\n")
    print("| task | density | full | masked | inverted | random mask, same density | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        s = r.scores
        print(f"| {r.task.name} | {r.masker.density_:.4f} | {s['full']:.3f} | {s['mask']:.3f} | {s['inverted']:.3f} | "
              f"{s['random']:.3f} | {r.masker.seconds_:.0f} |")
    for pair, iou in summary["iou"].items():
        layers = ", ".join(f"{k}: {v:.3f}" for k, v in iou["by_layer"].items())
        print(f"\nIoU {pair}: {iou['all']:.4f} (by layer {layers})")


RUNS = {"cluster-weights": cluster_weights, "cluster-corr": cluster_corr, "mask": mask}

if __name__ == "__main__":
    torch.set_num_threads(2)
    names = sys.argv[1:] or ["all"]
    for name in RUNS if names == ["all"] else names:
        RUNS[name]()
