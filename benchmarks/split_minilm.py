"""The real proof of `posthoc split cluster` and `posthoc split mask` on all-MiniLM-L6-v2 with BBC News.

    .venv/bin/python benchmarks/split_minilm.py cluster-weights   # |W| graphs, 20 weight shuffles, labels
    .venv/bin/python benchmarks/split_minilm.py cluster-corr      # activation correlation, 20 token shuffles
    .venv/bin/python benchmarks/split_minilm.py mask              # two topic tasks, weight masks, IoU
    .venv/bin/python benchmarks/split_minilm.py all

Outputs (reports, modules, JSON) go to benchmarks/.work/split/<run>/; a Markdown summary of each run is
printed (it is what benchmarks/RESULTS.md quotes). Settings are chosen for 2 shared CPU cores;
THREADS=N (default 1) sets torch's threads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from posthoc.analyse.cluster.report import verdict
from posthoc.analyse.cluster.run import split_cluster
from posthoc.analyse.masks.run import parse_task, split_mask
from posthoc.assets import minilm_dir

WORK = Path(__file__).resolve().parent / ".work" / "split"
STEPS, ALPHA = 120, 5e-5  # masks: a kept weight must be worth 5e-5 nats of task loss
CLUSTER = {"max_label_texts": 100, "ablation_baselines": 2, "max_length": 64, "n_clusters": 8, "shuffles": 20}
THREADS = int(os.environ.get("THREADS", "1"))  # the 2 shared cores of the project machine: one each


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def show_cluster(c, started: float) -> None:
    print(f"\n### {c.graph} graph, {c.method}, K = {c.n_clusters}, {c.shuffles} shuffles "
          f"({time.perf_counter() - started:.0f} s on {THREADS} thread(s), {load()} at the end; "
          f"timings {json.dumps({k: round(v) for k, v in c.timings_.items()})})\n")
    print(verdict(c) + "\n")
    print("| FFN | Q | Q shuffled (mean ± std) | z(Q) | n-cut | n-cut shuffled | z(n-cut) | modular |")
    print("|---|---|---|---|---|---|---|---|")
    for u in c.units_:
        print(f"| {u.name} | {u.q.real:.4f} | {u.q.mean:.4f} ± {u.q.std:.4f} | {u.q.z:+.1f} | {u.ncut.real:.3f} | "
              f"{u.ncut.mean:.3f} ± {u.ncut.std:.3f} | {u.ncut.z:+.1f} | {u.modular} |")
    if c.function_ is not None:
        lift = c.function_ / c.prevalence_[None, :]
        print("\nClusters with the largest lift (AP / prevalence):\n")
        print("| cluster | size | label | AP | prevalence | lift | ablated: accuracy drop | random sets | "
              "loss increase | random sets | z (loss) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        ablation = {r["cluster"]: r for r in c.ablation_}
        nan = float("nan")
        for i in np.argsort(-lift.max(1))[:8]:
            k = int(np.argmax(lift[i]))
            r = ablation.get(c.clusters_[i].id, {})
            print(f"| {c.clusters_[i].id} | {c.clusters_[i].size} | {c.label_names_[k]} | {c.function_[i, k]:.3f} | "
                  f"{c.prevalence_[k]:.3f} | {lift[i, k]:.2f} | {r.get('drop', nan):+.3f} | "
                  f"{r.get('random_mean', nan):+.3f} ± {r.get('random_std', nan):.3f} | "
                  f"{r.get('loss_increase', nan):+.3f} | {r.get('random_loss_mean', nan):+.3f} ± "
                  f"{r.get('random_loss_std', nan):.3f} | {r.get('z_loss', nan):+.1f} |")
        if c.ablation_:
            worst = sorted(c.ablation_, key=lambda r: -r["loss_increase"])[:5]
            beats = sum(r["loss_increase"] > max(r["random_loss_increases"], default=nan) for r in c.ablation_)
            print(f"\nFull-model probe accuracy {c.full_accuracy_:.3f}, loss {c.full_loss_:.3f} on {c.eval_texts_} "
                  f"held-out texts ({c.probe_texts_} trained the probe). {beats} of {len(c.ablation_)} clusters cost "
                  "more loss than every random set of their size. Most costly ablations (loss increase): "
                  + "; ".join(f"{r['cluster']} ({r['size']} neurons) {r['loss_increase']:+.3f} vs random "
                              f"{r['random_loss_mean']:+.3f} ± {r['random_loss_std']:.3f}, accuracy "
                              f"−{r['drop']:.3f} vs −{r['random_mean']:.3f}" for r in worst))


def cluster_weights() -> None:
    started = time.perf_counter()
    c = split_cluster(minilm_dir(), WORK / "cluster-weights", None, labels="bbc:test", force=True, threads=THREADS,
                      **CLUSTER)
    show_cluster(c, started)


def cluster_corr() -> None:
    started = time.perf_counter()
    c = split_cluster(minilm_dir(), WORK / "cluster-corr", "bbc:train", labels="bbc:test", force=True,
                      graph="correlation", max_tokens=20_000, shuffle_tokens=2048, threads=THREADS, **CLUSTER)
    show_cluster(c, started)


def mask() -> None:
    started = time.perf_counter()
    tasks = [parse_task(f"bbc:{classes}", train_per_class=60, test_per_class=40)
             for classes in ("business,entertainment,politics", "sports,tech")]
    results = split_mask(minilm_dir(), WORK / "mask", tasks, force=True, steps=STEPS, batch_size=8, max_length=32,
                         lr=0.1, alpha=ALPHA, threads=THREADS)
    summary = json.loads((WORK / "mask" / "masks.json").read_text())
    print(f"\n### weight masks, α = {ALPHA:g}, {STEPS} steps of 8 texts × 32 tokens, lr 0.1 "
          f"({time.perf_counter() - started:.0f} s on {THREADS} thread(s), {load()} at the end)\n")
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
    torch.set_num_threads(THREADS)
    print(f"start: {load()}")
    names = sys.argv[1:] or ["all"]
    for name in RUNS if names == ["all"] else names:
        RUNS[name]()
