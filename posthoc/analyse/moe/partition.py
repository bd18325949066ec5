"""Partitions of FFN neurons into experts: pure functions from weights or statistics to expert labels.

Every partition returns `labels` (n,) long in [0, E), with exactly `sizes[e]` neurons labelled e. Sizes
come from `expert_sizes`: when E does not divide n, the first n mod E experts get one neuron more
(sizes differ by at most one); nothing is dropped and nothing is padded.

    random          a seeded permutation cut into consecutive groups
    kmeans          balanced k-means on the L2-normalised rows of the FFN's first matrix (MoEfication);
                    assignment respects the sizes (greedy on the sorted neuron-centre similarities)
    coactivation    the co-activation graph (tokens on which two neurons are both active), edges below a
                    percentile dropped, cut by METIS into E parts, then rebalanced to the exact sizes by
                    moving the neurons with the least affinity to their part
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posthoc.errors import ConfigError

PARTITIONS = ("random", "kmeans", "coactivation")


def expert_sizes(n: int, experts: int) -> list[int]:
    """Sizes of `experts` experts over n neurons, as equal as possible (larger ones first)."""
    if not 1 <= experts <= n:
        raise ConfigError(f"cannot split {n} neurons into {experts} experts (need 1 <= experts <= {n})")
    base, extra = divmod(n, experts)
    return [base + 1] * extra + [base] * (experts - extra)


def random_partition(n: int, sizes: list[int], *, seed: int = 0) -> torch.Tensor:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    labels = torch.empty(n, dtype=torch.long)
    labels[perm] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return labels


def balanced_assign(similarity: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Assign n items to E groups of fixed sizes by similarity (n, E), in rounds: every unassigned item
    proposes to its most similar group that still has room; a group over-asked keeps its most similar
    proposers. Each round fills at least one group, so there are at most E rounds."""
    n, e = similarity.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.tensor(sizes, dtype=torch.long)
    while True:
        free = (labels < 0).nonzero().flatten()
        if len(free) == 0:
            return labels
        sim = similarity[free].clone()
        sim[:, room == 0] = -torch.inf
        choice = sim.argmax(1)
        for g in choice.unique().tolist():
            asking = (choice == g).nonzero().flatten()
            if len(asking) > room[g]:
                asking = asking[sim[asking, g].topk(int(room[g])).indices]
            labels[free[asking]] = g
            room[g] -= len(asking)


def balanced_kmeans(rows: torch.Tensor, sizes: list[int], *, seed: int = 0, iterations: int = 20) -> torch.Tensor:
    """Balanced spherical k-means of rows (n, d) (normalised here) into groups of `sizes`."""
    x = torch.nn.functional.normalize(rows.float(), dim=1)
    n, e = x.shape[0], len(sizes)
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(n, generator=generator)[:e]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = balanced_assign(x @ centres.T, sizes)
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        centres = torch.nn.functional.normalize(sums, dim=1)
    return labels


def coactivation_partition(
    counts: torch.Tensor, sizes: list[int], *, keep_percentile: float = 0.9, seed: int = 0
) -> torch.Tensor:
    """METIS partition of the co-activation graph (counts (n, n), symmetric), rebalanced to `sizes`.

    Edges whose weight is below the `keep_percentile` quantile of off-diagonal weights are dropped
    (MoEfication keeps the strongest edges only: the graph stays sparse and METIS fast).
    """
    import pymetis

    n, e = counts.shape[0], len(sizes)
    if e == 1:
        return torch.zeros(n, dtype=torch.long)
    w = counts.double().clone()
    w.fill_diagonal_(0)
    off = w[~torch.eye(n, dtype=torch.bool)]
    threshold = torch.quantile(off[:1_000_000] if off.numel() > 1_000_000 else off, keep_percentile).item()
    w[w < max(threshold, 1e-12)] = 0
    scale = 1000.0 / max(float(w.max()), 1e-12)
    weights = (w * scale).round().long()
    adjacency = weights > 0
    xadj = [0]
    adjncy: list[int] = []
    eweights: list[int] = []
    for i in range(n):
        neighbours = adjacency[i].nonzero().flatten()
        adjncy.extend(neighbours.tolist())
        eweights.extend(weights[i, neighbours].tolist())
        xadj.append(len(adjncy))
    options = pymetis.Options(seed=seed, ufactor=1)  # tightest balance METIS allows (0.1 %)
    _, parts = pymetis.part_graph(e, xadj=xadj, adjncy=adjncy, eweights=eweights, options=options)
    labels = torch.tensor(parts, dtype=torch.long)
    # name the parts so the largest gets the largest target size (sizes differ by at most one): only
    # neurons that must move are moved
    by_count = torch.bincount(labels, minlength=e).argsort(descending=True, stable=True)
    rename = torch.empty(e, dtype=torch.long)
    rename[by_count] = torch.tensor(sorted(range(e), key=lambda g: -sizes[g]))
    return rebalance(rename[labels], w, sizes)


def rebalance(labels: torch.Tensor, affinity: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Move neurons out of oversized parts into undersized ones until every part has its exact size.

    Each move takes, from an oversized part, the neuron whose affinity (sum of edge weights) to its own
    part is lowest relative to its best undersized part, so the cut grows as little as possible.
    """
    labels = labels.clone()
    e = len(sizes)
    while True:
        counts = torch.bincount(labels, minlength=e)
        over = [g for g in range(e) if counts[g] > sizes[g]]
        under = [g for g in range(e) if counts[g] < sizes[g]]
        if not over:
            return labels
        one_hot = torch.nn.functional.one_hot(labels, e).to(affinity.dtype)
        to_part = affinity @ one_hot  # (n, E): each neuron's total affinity to each part
        members = (labels == over[0]).nonzero().flatten()
        gain = to_part[members][:, under] - to_part[members, over[0]][:, None]  # (members, under)
        best = gain.reshape(-1).argmax().item()
        i, g = divmod(best, len(under))
        labels[members[i]] = under[g]


def partition_neurons(
    method: str,
    sizes: list[int],
    *,
    rows: torch.Tensor | None = None,
    coactivation: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Dispatch by name; `rows` for kmeans, `coactivation` counts for coactivation."""
    n = sum(sizes)
    makers: dict[str, Callable[[], torch.Tensor]] = {
        "random": lambda: random_partition(n, sizes, seed=seed),
        "kmeans": lambda: balanced_kmeans(rows, sizes, seed=seed),
        "coactivation": lambda: coactivation_partition(coactivation, sizes, seed=seed),
    }
    if method not in makers:
        raise ConfigError(f"partition {method!r} is unknown; use one of {', '.join(PARTITIONS)}")
    labels = makers[method]()
    counts = torch.bincount(labels, minlength=len(sizes)).tolist()
    if counts != list(sizes):  # a broken invariant, not bad input
        raise RuntimeError(f"partition {method} produced sizes {counts}, expected {sizes}")
    return labels


def order_from_labels(labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The neuron order that makes experts contiguous: expert 0's neurons first (in index order), …"""
    return torch.cat([(labels == g).nonzero().flatten() for g in range(len(sizes))])
