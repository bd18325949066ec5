"""How the cost of `posthoc split cluster` grows with tokens and neurons (synthetic inputs, no model).

    .venv/bin/python benchmarks/cluster_scaling.py [--quick]

1. Activation statistics: stream T tokens of d_ff neuron activations through the statistics the
   activation graphs use (SecondMoments for correlation, CoActivation for co-activation): time and the
   process's peak memory, for growing T (memory must stay flat: only d_ff × d_ff sums are kept).
2. One graph: build, cluster (spectral, K = 8) and score, for growing d_ff: the weight graph of one FFN
   (d = d_ff / 4, bipartite, solved through its Gram matrix) and a neuron-neuron correlation graph. A
   unit's shuffle test costs (1 + shuffles) times this.
Prints a Markdown table per part (paste into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from posthoc.analyse.activations import CoActivation, SecondMoments, TokenInfo
from posthoc.analyse.cluster.graphs import (
    activation_graph,
    correlation,
    modularity,
    normalized_cut,
    spectral_clusters,
    weight_graph,
)
from posthoc.ffn import FFN, FFNWeights


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream(statistic, d_ff: int, tokens: int, batch: int = 2048) -> tuple[float, float]:
    weights = FFNWeights(torch.randn(d_ff, 64), torch.randn(64, d_ff), torch.nn.functional.gelu)
    ffn = FFN(0, "ffn", "up", "down", None, torch.nn.functional.gelu, "gelu")
    statistic.start(ffn, weights)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    seen = 0
    while seen < tokens:
        n = min(batch, tokens - seen)
        h = torch.nn.functional.gelu(torch.randn(n, d_ff, generator=generator))
        statistic.update(None, h, TokenInfo(None, seen))
        seen += n
    statistic.result()
    return time.perf_counter() - started, peak_mb()


def one_graph(kind: str, d_ff: int) -> float:
    torch.manual_seed(0)
    started = time.perf_counter()
    if kind == "weights":
        g = weight_graph([(0, torch.randn(d_ff, d_ff // 4), torch.randn(d_ff // 4, d_ff), None)])
        sides = g.kinds == "neuron"
    else:
        h = torch.nn.functional.gelu(torch.randn(4096, d_ff))
        g = activation_graph(correlation([h]), [0], [d_ff])
        sides = None
    labels = spectral_clusters(g.adjacency, 8, sides=sides)
    modularity(g.adjacency, labels)
    normalized_cut(g.adjacency, labels)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    token_counts = [8_192, 32_768] if args.quick else [8_192, 32_768, 131_072]
    sizes = [384, 768, 1536] if args.quick else [384, 768, 1536, 3072]

    print("| statistic | d_ff | tokens | seconds | µs / token | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for name, make in (("SecondMoments", lambda: SecondMoments(of="h")), ("CoActivation", lambda: CoActivation(top_fraction=0.1))):
        for tokens in token_counts:
            seconds, rss = stream(make(), 1536, tokens)
            print(f"| {name} | 1536 | {tokens} | {seconds:.2f} | {seconds / tokens * 1e6:.1f} | {rss:.0f} |")
    print()
    print("| graph | d_ff | nodes | seconds per graph (build + spectral K=8 + Q + n-cut) |")
    print("|---|---|---|---|")
    for kind in ("weights", "correlation"):
        for d_ff in sizes:
            nodes = d_ff + 2 * (d_ff // 4) if kind == "weights" else d_ff
            print(f"| {kind} | {d_ff} | {nodes} | {one_graph(kind, d_ff):.2f} |")


if __name__ == "__main__":
    main()
