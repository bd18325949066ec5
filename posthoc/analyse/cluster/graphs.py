"""Neuron graphs and how modular they are: pure functions on adjacency matrices (no model, no I/O).

A neuron graph is a symmetric, non-negative adjacency matrix A (n, n) with a zero diagonal and a node
table saying what each row is. Two families (Filan et al. 2021; Hod et al. 2022):

    weights       one FFN as a tripartite graph  inputs (d) — neurons (d_ff) — outputs (d):
                  edge(input j, neuron i) = |W_up[i, j]| (+ |W_gate[i, j]| for GLU FFNs),
                  edge(neuron i, output k) = |W_down[k, i]|. Adjacent FFNs chain through the residual
                  stream: FFN ℓ's outputs are FFN ℓ+1's inputs (attention in between is not modelled).
    activations   neurons only: |correlation| of neuron activations over tokens, or co-activation counts
                  (tokens on which both are active); adjacent layers add the cross-layer block.

Partitions: spectral clustering to K (top-K eigenvectors of D^-½ A D^-½ from scipy's eigensolver,
rows normalised, k-means; Ng, Jordan & Weiss) or Louvain (networkx). Scores: Newman's modularity

    Q = Σ_c [ e_c / W − (d_c / W)² ]     e_c = Σ_{i,j ∈ c} A_ij,  d_c = Σ_{i ∈ c} deg_i,  W = Σ_ij A_ij

(the same number as networkx.community.modularity) and the normalised cut n-cut = Σ_c cut(c, rest) / vol(c)
= Σ_c (d_c − e_c) / d_c (lower is more modular; Shi & Malik). A graph is judged against shuffles of itself
(`shuffle_test`): weights permuted within each matrix, or activations permuted across tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from posthoc.errors import ConfigError
from posthoc.threads import torch_threads

METHODS = ("spectral", "louvain")


@dataclass
class NeuronGraph:
    """An adjacency matrix and what its nodes are.

    kinds[i] is "neuron", "input", "output" or "residual"; layers[i] the FFN index; units[i] the neuron
    (or hidden dimension) number within that FFN.
    """

    adjacency: np.ndarray  # (n, n) float32, symmetric, zero diagonal
    kinds: np.ndarray  # (n,) str
    layers: np.ndarray  # (n,) int
    units: np.ndarray  # (n,) int
    name: str = ""

    @property
    def size(self) -> int:
        return self.adjacency.shape[0]

    def neuron_nodes(self) -> np.ndarray:
        return np.flatnonzero(self.kinds == "neuron")


# ---------------------------------------------------------------------------------------- building


def _symmetric(blocks: Sequence[tuple[slice, slice, np.ndarray]], n: int) -> np.ndarray:
    a = np.zeros((n, n), dtype=np.float32)
    for rows, cols, block in blocks:
        a[rows, cols] = block
        a[cols, rows] = block.T
    return a


def weight_graph(
    ffns: Sequence[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]], name: str = ""
) -> NeuronGraph:
    """The |W| graph of one FFN or a chain of adjacent FFNs.

    ffns: (layer, W_up (d_ff, d), W_down (d, d_ff), W_gate or None) in order. Nodes: inputs of the first
    FFN, then per FFN its neurons and the d residual dimensions after it (the last FFN's outputs).
    """
    sizes = [(w_up.shape[0], w_up.shape[1]) for _, w_up, _, _ in ffns]
    d = sizes[0][1]
    if any(s[1] != d for s in sizes):
        raise ConfigError("chained FFNs must share the hidden size")
    n = d + sum(d_ff + d for d_ff, _ in sizes)
    kinds, layers, units, blocks = [], [], [], []
    kinds += ["input"] * d
    layers += [ffns[0][0]] * d
    units += list(range(d))
    start = 0  # where the current FFN's input nodes begin
    for i, (layer, w_up, w_down, w_gate) in enumerate(ffns):
        d_ff = w_up.shape[0]
        neurons = slice(start + d, start + d + d_ff)
        outputs = slice(start + d + d_ff, start + 2 * d + d_ff)
        w_in = w_up.abs() if w_gate is None else w_up.abs() + w_gate.abs()
        blocks.append((neurons, slice(start, start + d), w_in.float().numpy()))
        blocks.append((outputs, neurons, w_down.abs().float().numpy()))
        kinds += ["neuron"] * d_ff + ["output" if i == len(ffns) - 1 else "residual"] * d
        layers += [layer] * d_ff + [layer] * d
        units += list(range(d_ff)) + list(range(d))
        start += d + d_ff
    return NeuronGraph(_symmetric(blocks, n), np.array(kinds), np.array(layers), np.array(units), name)


def activation_graph(
    blocks: dict[tuple[int, int], torch.Tensor], layers: Sequence[int], d_ff: Sequence[int], name: str = ""
) -> NeuronGraph:
    """Neurons of one or more FFNs; `blocks[(a, b)]` (d_ff[a], d_ff[b]) are non-negative edge weights
    between the neurons of layers[a] and layers[b] (a <= b; the diagonal of a == b blocks is ignored)."""
    offsets = np.concatenate([[0], np.cumsum(d_ff)])
    n = int(offsets[-1])
    parts = []
    for (a, b), block in blocks.items():
        values = block.detach().abs().float().numpy().copy() if torch.is_tensor(block) else np.abs(block)
        if a == b:
            np.fill_diagonal(values, 0.0)
        parts.append((slice(offsets[b], offsets[b + 1]), slice(offsets[a], offsets[a + 1]), values.T))
    adjacency = _symmetric(parts, n)
    kinds = np.array(["neuron"] * n)
    layer_of = np.concatenate([[layer] * size for layer, size in zip(layers, d_ff)])
    units = np.concatenate([np.arange(size) for size in d_ff])
    return NeuronGraph(adjacency, kinds, layer_of.astype(int), units.astype(int), name)


def correlation(samples: Sequence[torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    """|Pearson correlation| blocks between the columns of aligned (tokens, d_ff) samples (same tokens)."""
    centred = []
    for s in samples:  # centred and scaled in float64, multiplied in float32 (|error| ~1e-7, 3x faster)
        s = s.double()
        s = s - s.mean(0)
        centred.append((s / s.norm(dim=0).clamp(min=1e-12)).float())
    return {(a, b): (centred[a].T @ centred[b]).abs() for a in range(len(samples)) for b in range(a, len(samples))}


def coactivation(markers: Sequence[torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    """Co-activation count blocks BᵀB of aligned (tokens, d_ff) 0/1 markers."""
    return {(a, b): markers[a].T @ markers[b] for a in range(len(markers)) for b in range(a, len(markers))}


def sparsify(adjacency: np.ndarray, keep_fraction: float | None) -> np.ndarray:
    """Keep the strongest `keep_fraction` of the edges (ties at the threshold kept); None keeps all."""
    if keep_fraction is None or keep_fraction >= 1:
        return adjacency
    upper = adjacency[np.triu_indices_from(adjacency, 1)]
    positive = upper[upper > 0]
    if positive.size == 0:
        return adjacency
    k = max(1, int(round(keep_fraction * upper.size)))
    if k >= positive.size:
        return adjacency
    threshold = np.partition(positive, positive.size - k)[positive.size - k]
    return np.where(adjacency >= threshold, adjacency, 0).astype(adjacency.dtype)


# ------------------------------------------------------------------------------------------- scores


def _membership(labels: np.ndarray) -> tuple[np.ndarray, int]:
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if inverse.size else 0


def _blocks(adjacency: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(e_c, d_c): within-community weight (both directions) and total degree per community."""
    inverse, k = _membership(labels)
    onehot = np.zeros((adjacency.shape[0], k), dtype=np.float64)
    onehot[np.arange(adjacency.shape[0]), inverse] = 1.0
    per_node = adjacency.astype(np.float64) @ onehot  # (n, k): weight from node i into community c
    e = (onehot * per_node).sum(0)
    d = per_node.sum(1) @ onehot
    return e, d


def modularity(adjacency: np.ndarray, labels: np.ndarray, resolution: float = 1.0) -> float:
    """Newman's weighted modularity Q of a partition (`labels[i]` = community of node i)."""
    e, d = _blocks(adjacency, labels)
    total = d.sum()
    if total <= 0:
        return 0.0
    return float((e / total).sum() - resolution * ((d / total) ** 2).sum())


def normalized_cut(adjacency: np.ndarray, labels: np.ndarray) -> float:
    """Σ_c cut(c, rest) / vol(c) over communities of non-zero volume."""
    e, d = _blocks(adjacency, labels)
    keep = d > 0
    return float(((d[keep] - e[keep]) / d[keep]).sum())


# ---------------------------------------------------------------------------------------- partitions


@contextmanager
def _single_thread() -> Iterator[None]:
    """LAPACK's eigensolvers scale badly past one thread and collapse when cores are shared (a 768 × 768
    eigh took 16 s on 2 busy threads, 1 s on one): run them on one."""
    with torch_threads(1):
        yield


def spectral_embedding(adjacency: np.ndarray, k: int, seed: int = 0, sides: np.ndarray | None = None) -> np.ndarray:
    """The top-k eigenvectors of D^-½ A D^-½ (n, k), from exact dense solvers.

    A bipartite graph (edges only between `sides` and the rest: the weight graph, neurons vs hidden
    dimensions) is solved through its biadjacency block B: the eigenvectors of [[0, B], [Bᵀ, 0]] for its
    largest eigenvalues are [u; v] / √2 of B's top singular triplets (Dhillon's spectral co-clustering),
    found from the eigenvectors of the smaller Gram matrix. The dense solvers are torch's, so they run on
    the threads `torch.set_num_threads` allows (BLAS libraries left to themselves oversubscribe shared
    CPUs); graphs above 1,024 nodes (with k <= n/8) use scipy's Lanczos solver for the top k instead.
    """
    n = adjacency.shape[0]
    a = torch.from_numpy(np.ascontiguousarray(adjacency, dtype=np.float64))
    degree = a.sum(1)
    inv_sqrt = torch.where(degree > 0, degree.clamp(min=1e-300).rsqrt(), torch.zeros((), dtype=a.dtype))
    normalised = a * inv_sqrt[:, None] * inv_sqrt[None, :]
    if sides is not None and 0 < sides.sum() < n and k <= min(sides.sum(), n - sides.sum()):
        rows, cols = torch.from_numpy(np.flatnonzero(sides)), torch.from_numpy(np.flatnonzero(~sides))
        if not normalised[rows][:, rows].any() and not normalised[cols][:, cols].any():
            b = normalised[rows][:, cols]  # (m, p)
            small = b.T @ b if b.shape[1] <= b.shape[0] else b @ b.T
            with _single_thread():
                values, vectors = torch.linalg.eigh(small)  # ascending
            values, vectors = values[-k:].clamp(min=1e-300), vectors[:, -k:]
            sigma = values.sqrt()
            if b.shape[1] <= b.shape[0]:
                v, u = vectors, (b @ vectors) / sigma
            else:
                u, v = vectors, (b.T @ vectors) / sigma
            out = torch.zeros(n, k, dtype=torch.float64)
            out[rows], out[cols] = u, v
            return out.numpy()
    if n <= 1024 or k > n // 8:
        with _single_thread():
            return torch.linalg.eigh(normalised.float())[1][:, -k:].double().numpy()
    from scipy.sparse.linalg import LinearOperator, eigsh

    # Lanczos for the top k only (4x faster than a full eigh at n = 1536). The products run in torch on one thread (float32: half the time of float64): numpy's BLAS on its own
    # threads took 2.5 s instead of 0.2 s for n = 1536 on two busy cores.
    matrix = normalised.float()
    operator = LinearOperator((n, n), dtype=np.float32, matvec=lambda x: (
        matrix @ torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))).numpy())
    start = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    with _single_thread():
        return eigsh(operator, k=k, which="LA", v0=start, tol=1e-5)[1].astype(np.float64)


def spectral_clusters(
    adjacency: np.ndarray, k: int, seed: int = 0, n_init: int = 5, sides: np.ndarray | None = None
) -> np.ndarray:
    """Spectral clustering into at most k communities (labels 0..k'−1, k' <= k; empty ones dropped):
    rows of the spectral embedding normalised to unit length, then k-means (best of `n_init`)."""
    from scipy.cluster.vq import kmeans2

    n = adjacency.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"cannot cut a graph of {n} nodes into {k} clusters")
    if k == 1:
        return np.zeros(n, dtype=int)
    vectors = spectral_embedding(adjacency, k, seed, sides)
    rows = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centroids, labels = kmeans2(rows, k, minit="++", seed=rng)
        inertia = float(((rows - centroids[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return _membership(best)[0]


def louvain_clusters(adjacency: np.ndarray, seed: int = 0, resolution: float = 1.0) -> np.ndarray:
    """Louvain communities (networkx), as labels 0..k−1 ordered by first node."""
    import networkx as nx

    graph = to_networkx(adjacency)
    communities = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    labels = np.empty(adjacency.shape[0], dtype=int)
    for c, members in enumerate(sorted(communities, key=min)):
        labels[list(members)] = c
    return labels


def partition(
    adjacency: np.ndarray, method: str, k: int, seed: int = 0, resolution: float = 1.0, sides: np.ndarray | None = None
) -> np.ndarray:
    if method == "spectral":
        return spectral_clusters(adjacency, k, seed, sides=sides)
    if method == "louvain":
        return louvain_clusters(adjacency, seed, resolution)
    raise ConfigError(f"clustering method {method!r} is unknown; use one of {', '.join(METHODS)}")


def to_networkx(adjacency: np.ndarray, graph: NeuronGraph | None = None, labels: np.ndarray | None = None):
    """A networkx Graph of the non-zero edges; node attributes from `graph` (kind, layer, unit) and labels."""
    import networkx as nx

    rows, cols = np.nonzero(np.triu(adjacency, 1))
    g = nx.Graph()
    g.add_nodes_from(range(adjacency.shape[0]))
    g.add_weighted_edges_from(zip(rows.tolist(), cols.tolist(), adjacency[rows, cols].astype(float).tolist()))
    if graph is not None:
        for i in range(graph.size):
            node = g.nodes[i]
            node["kind"] = str(graph.kinds[i])
            node["layer"] = int(graph.layers[i])
            node["unit"] = int(graph.units[i])
            if labels is not None:
                node["cluster"] = int(labels[i])
    return g


# ---------------------------------------------------------------------------------------- baselines


@dataclass
class ShuffleTest:
    """A score of the real graph against the same score of its shuffles."""

    name: str  # "Q" or "n-cut"
    real: float
    shuffled: list[float] = field(default_factory=list)
    higher_is_better: bool = True

    @property
    def mean(self) -> float:
        return float(np.mean(self.shuffled)) if self.shuffled else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.shuffled, ddof=1)) if len(self.shuffled) > 1 else float("nan")

    @property
    def z(self) -> float:
        """(real − mean) / std of the shuffles (Q: > 0 is modular; n-cut: < 0 is modular)."""
        std = self.std
        if not np.isfinite(std):
            return float("nan")
        if std == 0:
            return 0.0 if self.real == self.mean else float(np.sign(self.real - self.mean) * np.inf)
        return (self.real - self.mean) / std

    @property
    def beats(self) -> float:
        """Fraction of shuffles the real graph is strictly more modular than (its percentile)."""
        if not self.shuffled:
            return float("nan")
        s = np.asarray(self.shuffled)
        better = s < self.real if self.higher_is_better else s > self.real
        return float(better.mean())

    @property
    def p_value(self) -> float:
        """One-sided permutation p-value: (1 + shuffles at least as modular) / (1 + shuffles)."""
        s = np.asarray(self.shuffled)
        as_good = (s >= self.real).sum() if self.higher_is_better else (s <= self.real).sum()
        return float((1 + as_good) / (1 + s.size))

    def to_dict(self) -> dict[str, float | str | list[float]]:
        return {"score": self.name, "real": self.real, "shuffled_mean": self.mean, "shuffled_std": self.std,
                "z": self.z, "beats": self.beats, "percentile": 100 * self.beats, "p_value": self.p_value,
                "shuffled": list(self.shuffled)}


def permute_within(matrix: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The entries of a matrix in a random order (Filan et al.'s within-layer weight shuffle)."""
    flat = matrix.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=generator)].reshape(matrix.shape)


def permute_tokens(sample: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each column (neuron) of a (tokens, d_ff) sample permuted independently across tokens.

    numpy's `permuted` shuffles every column in place in O(tokens) (sorting random keys took 20x longer)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    values = sample.detach().cpu().numpy().copy()
    return torch.from_numpy(np.random.default_rng(seed).permuted(values, axis=0, out=values))
