"""Neuron clustering: is a trained transformer modular, which modules serve which function, what do they cost?

    clusters = NeuronClusterer(graph="weights", method="spectral", n_clusters=8).fit(model_dir, "bbc:train",
                                                                                      labels="bbc:test")
    clusters.units_[0].ncut.z          # n-cut of FFN 0's graph vs 20 weight shuffles (z < 0: modular)
    clusters.clusters_[3].neurons      # {layer: neuron indices}
    clusters.function_                 # average precision of each cluster's activation per label
    clusters.ablation_                 # probe accuracy drop when a cluster is ablated vs random sets

Per FFN (or per pair of adjacent FFNs with `across_layers=True`) a neuron graph is built
(`posthoc.analyse.cluster.graphs`): from the weights (|W|, Filan et al.), or from activations on calibration text
(|correlation| or co-activation counts, streamed over every token by `posthoc.analyse.activations`).
It is cut into communities (spectral to K, or Louvain), scored by modularity Q and n-cut, and the same is
done to `shuffles` shuffled copies: weights permuted within each matrix, or activations permuted across
tokens (each neuron independently, on a reservoir sample of `shuffle_tokens` tokens; the Q and n-cut of
such null graphs do not depend on the token count for correlations, and only grow with fewer tokens for
co-activation counts, so the test is conservative). A unit is called modular only when its primary score
(n-cut for spectral, Q for Louvain) beats every shuffle (p = 1/(shuffles+1) <= 0.05 with 20 shuffles).

With labelled texts (`labels=`), each cluster's activation on a text (mean |h| over its neurons and the
text's tokens) is ranked against each label: average precision, next to the label's prevalence (the AP of
a random ranking). A linear probe trained on the full model's embeddings of half the labelled texts is read
on the other half with each cluster ablated (neurons zeroed), against `ablation_baselines` random neuron
sets of the same size in the same layers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from posthoc.analyse.activations import (
    ActiveCounts,
    CoActivation,
    InputSample,
    SecondMoments,
    collect,
    edit_neurons,
    neuron_masks,
)
from posthoc.analyse.base import Analyser, frozen
from posthoc.analyse.calibration import CalibrationData
from posthoc.analyse.cluster.graphs import (
    METHODS,
    NeuronGraph,
    ShuffleTest,
    activation_graph,
    coactivation,
    correlation,
    modularity,
    normalized_cut,
    partition,
    permute_tokens,
    permute_within,
    sparsify,
    weight_graph,
)
from posthoc.analyse.evaluate import pooled_states
from posthoc.analyse.params import FLOAT_OR_AUTO, INT_LIST, Param, ParamTable, choice, is_int, is_number
from posthoc.analyse.texts import TokenizedTexts
from posthoc.errors import ConfigError, DataError
from posthoc.ffn import FFN, ffn_weights, find_ffns
from posthoc.finetune import linear_probe
from posthoc.progress import progress_bar
from posthoc.threads import torch_threads

log = logging.getLogger(__name__)

GRAPHS = ("weights", "correlation", "coactivation")


def _fraction_or_auto(v: Any, p: dict[str, Any]) -> bool:
    return v is None or v == "auto" or (is_number(v) and 0 < v <= 1)


PARAMS = ParamTable("NeuronClusterer", [
    choice("graph", "weights", GRAPHS,
           "weights: |W| between inputs, neurons and outputs; correlation / coactivation: from activations."),
    choice("method", "spectral", METHODS,
           "spectral: K communities from the normalised graph's eigenvectors; louvain: networkx, K found by the method."),
    Param("n_clusters", 8, "an int >= 2 (and at most the neurons of an FFN)", lambda v, p: is_int(v) and v >= 2,
          "K for spectral clustering.", int),
    Param("resolution", 1.0, "a number > 0", lambda v, p: is_number(v) and v > 0, "Louvain resolution.", float),
    Param("edge_fraction", "auto", "'auto', None or a number in (0, 1]", _fraction_or_auto,
          "Keep this fraction of the strongest edges before clustering (auto: all for spectral, 0.02 for "
          "Louvain, whose cost grows with the edges).", FLOAT_OR_AUTO),
    Param("across_layers", False, "a bool", lambda v, p: isinstance(v, bool),
          "Cluster pairs of adjacent FFNs together (modules that span layers).", bool),
    Param("layers", None, "None or a list of FFN indices", lambda v, p: v is None or (
        isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(i) and i >= 0 for i in v)),
          "FFN indices to analyse, e.g. 0,1,2 (default: all).", INT_LIST),
    Param("shuffles", 20, "an int >= 0", lambda v, p: is_int(v) and v >= 0,
          "Shuffled copies each graph is compared with (0: no test, no verdict).", int),
    Param("shuffle_tokens", 4096, "an int >= 64", lambda v, p: is_int(v) and v >= 64,
          "Activation graphs: tokens sampled (per FFN, the same tokens) for shuffles and cross-layer blocks.", int),
    Param("top_fraction", 0.1, "a number in (0, 1]", lambda v, p: is_number(v) and 0 < v <= 1,
          "coactivation: a neuron is active on a token when among its top fraction of |h|.", float),
    Param("max_tokens", 50_000, "an int >= 64", lambda v, p: is_int(v) and v >= 64, "Calibration tokens streamed.", int),
    Param("max_length", 128, "an int >= 8", lambda v, p: is_int(v) and v >= 8, "Tokens per text.", int),
    Param("batch_size", 16, "an int >= 1", lambda v, p: is_int(v) and v >= 1, "Texts per forward pass.", int),
    Param("max_label_texts", 250, "an int >= 4", lambda v, p: is_int(v) and v >= 4,
          "Labelled texts used for function ties and ablations (stratified cap).", int),
    Param("ablation_baselines", 3, "an int >= 0", lambda v, p: is_int(v) and v >= 0,
          "Random neuron sets of the same size ablated per cluster (0: ablate clusters only).", int),
    Param("ablate", True, "a bool", lambda v, p: isinstance(v, bool), "Measure what ablating each cluster costs.", bool),
    Param("seed", 0, "an int >= 0", lambda v, p: is_int(v) and v >= 0, "Seed of clustering and shuffles.", int),
    Param("ffn_modules", None, "None or 'up=P,down=P[,gate=P][,act=NAME]'",
          lambda v, p: v is None or isinstance(v, (str, dict)), "FFN modules of models posthoc does not know.", str),
    Param("threads", None, "None or an int >= 1", lambda v, p: v is None or (is_int(v) and v >= 1), "torch threads.", int),
    Param("progress", True, "a bool", lambda v, p: isinstance(v, bool), "Show progress bars.", bool, cli=False),
])


# ---------------------------------------------------------------------------------------- results


@dataclass
class GraphUnit:
    """One graph (an FFN, or two adjacent ones), its communities and its shuffle tests."""

    layers: tuple[int, ...]
    graph: NeuronGraph  # as clustered (after sparsification)
    labels: np.ndarray  # community of every node
    q: ShuffleTest
    ncut: ShuffleTest
    primary: str  # the score the verdict uses: "n-cut" (spectral) or "Q" (louvain)

    @property
    def name(self) -> str:
        return "FFN " + "+".join(str(layer) for layer in self.layers)

    @property
    def test(self) -> ShuffleTest:
        return self.ncut if self.primary == "n-cut" else self.q

    @property
    def modular(self) -> bool | None:
        """True when the primary score beats every shuffle at p <= 0.05; None without shuffles."""
        if not self.test.shuffled:
            return None
        return self.test.p_value <= 0.05 and self.test.beats == 1.0

    def summary(self) -> dict[str, Any]:
        return {"unit": self.name, "layers": list(self.layers), "nodes": self.graph.size,
                "communities": int(len(np.unique(self.labels))), "primary": self.primary,
                "modular": self.modular, "Q": self.q.to_dict(), "n-cut": self.ncut.to_dict()}


@dataclass
class Cluster:
    """A community's neurons, per FFN index."""

    id: str  # "L3.C2" (FFN 3, community 2) or "L3-4.C2"
    unit: int
    community: int
    neurons: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(sum(len(v) for v in self.neurons.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "unit": self.unit, "community": self.community, "size": self.size,
                "neurons": {str(layer): idx.tolist() for layer, idx in self.neurons.items()}}


@dataclass
class LabelledTexts:
    texts: tuple[str, ...]
    labels: np.ndarray  # (n,) int
    label_names: tuple[str, ...]
    name: str


# ------------------------------------------------------------------------------------------ kernels


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of ranking by `scores` (descending; ties in index order) for binary `positive`."""
    positive = np.asarray(positive, dtype=bool)
    if positive.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = positive[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def as_labelled(labels: Any, data: CalibrationData | None, cap: int, seed: int) -> LabelledTexts:
    """Labelled texts from `labels`: labelled data (spec, TextClassificationData, CalibrationData with labels)
    or one label per text of `data` (ints or names). Checked: lengths, at least two classes. Capped at
    `cap` texts (the same number per class where possible, seeded)."""
    if isinstance(labels, Sequence) and not isinstance(labels, str) and (
        len(labels) == 0 or all(isinstance(v, (int, np.integer, str)) and not isinstance(v, bool) for v in labels)
    ):
        if data is None:
            raise DataError("labels given as one value per text need the calibration texts they label")
        if len(labels) != len(data):
            raise DataError(
                f"{len(labels)} labels for {len(data)} calibration texts ({data.name}): give one label per text"
            )
        names = tuple(sorted({str(v) for v in labels}))
        values = np.array([names.index(str(v)) for v in labels])
        texts, source = data.texts, f"{data.name} (given labels)"
    else:
        labelled = CalibrationData.of(labels)
        if labelled.labels is None:
            raise DataError(
                f"labels {labelled.name!r} carry no labels: give labelled data (e.g. bbc:test, folders:DIR, a .jsonl "
                "with a label field) or one label per calibration text"
            )
        names, values, texts, source = labelled.label_names, np.array(labelled.labels), labelled.texts, labelled.name
    present = np.unique(values)
    if present.size < 2:
        raise DataError(f"labels {source!r}: only one class ({names[int(present[0])] if present.size else 'none'}); "
                        "tying clusters to labels needs at least two")
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    per_class = max(2, cap // present.size)
    for c in present:
        members = np.flatnonzero(values == c)
        keep += sorted(rng.permutation(members)[:per_class].tolist())
    keep.sort()
    return LabelledTexts(tuple(texts[i] for i in keep), values[keep], tuple(names), source)


def stratified_halves(y: np.ndarray, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(first rows, second rows): each label's rows shuffled by `rng` and cut in half (the first half rounded
    down, at least one row)."""
    first, second = [], []
    for k in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == k))
        half = max(1, len(members) // 2)
        first += members[:half].tolist()
        second += members[half:].tolist()
    return first, second


def _against(value: float, baselines: list[float]) -> tuple[float, float, float]:
    """(mean, std, z) of a cluster's ablation cost against random sets of the same size (nan when undefined)."""
    mean = float(np.mean(baselines)) if baselines else float("nan")
    std = float(np.std(baselines, ddof=1)) if len(baselines) > 1 else float("nan")
    z = (value - mean) / std if np.isfinite(std) and std > 0 else float("nan")
    return mean, std, z


# --------------------------------------------------------------------------------------- estimator


class NeuronClusterer(Analyser, params=PARAMS):
    """Cluster FFN neurons into communities and test whether the model is more modular than its shuffles
    (the analyser contract of `posthoc.analyse.base`).

    Learned attributes (after `fit`): ffns_ (the FFNs analysed), units_ (list[GraphUnit]: graph,
    communities, Q and n-cut tests, verdict), clusters_ (list[Cluster], neuron communities of >= 1
    neuron), modular_ ({unit name: bool | None}), tokens_ (calibration tokens, 0 for weight graphs),
    label_names_, function_ ((clusters, labels) average precision), prevalence_ (labels,), ablation_
    (list of dicts: cluster, size, accuracy and loss with the cluster ablated, the same for random sets of its
    size, z of the accuracy drop and of the loss increase),
    full_accuracy_, full_loss_, cluster_activation_ ((texts, clusters) mean |h|), labels_source_,
    probe_texts_, eval_texts_, timings_, source_, and model_ / tokenizer_ (the model analysed, left as it
    was, and its tokenizer: what the cluster modules are written for).
    """

    # ------------------------------------------------------------------------------------------ fit

    def fit(self, model: Any, data: Any = None, *, labels: Any = None, tokenizer: Any = None) -> NeuronClusterer:
        """model: checkpoint spec or loaded model (+ tokenizer); data: calibration texts (needed for activation
        graphs); labels: labelled texts, or one label per calibration text (function ties, ablations)."""
        self.validate_params()
        started = time.perf_counter()
        calib = None if data is None else CalibrationData.of(data)
        if calib is not None and len(calib) == 0:
            raise DataError("calibration data holds no text")
        if calib is None and self.graph != "weights":
            raise DataError(f"a {self.graph} graph needs calibration data (texts to run the model on)")
        labelled = None if labels is None else as_labelled(labels, calib, self.max_label_texts, self.seed)
        model, tokenizer = self.model_for_fit(model, tokenizer, needs_tokenizer=calib is not None or labelled is not None)
        all_ffns = find_ffns(model, self.ffn_modules)
        self.ffns_ = self._watched(all_ffns)
        self._check_sizes(model)
        timings: dict[str, float] = {}
        with frozen(model), torch_threads(self.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            t0 = time.perf_counter()
            acts = None
            if self.graph != "weights":
                acts = self._collect(model, tokenizer, calib, all_ffns)
            self.tokens_ = 0 if acts is None else acts.tokens
            timings["collect"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.units_ = self._cluster_units(model, acts)
            timings["cluster_and_shuffles"] = time.perf_counter() - t0
            self.clusters_ = self._clusters()
            self.modular_ = {unit.name: unit.modular for unit in self.units_}
            self.label_names_, self.function_, self.prevalence_, self.ablation_ = (), None, None, []
            self.cluster_activation_ = self.labels_source_ = self.full_accuracy_ = self.full_loss_ = None
            self.probe_texts_ = self.eval_texts_ = None
            if labelled is not None:
                t0 = time.perf_counter()
                self._tie_to_labels(model, tokenizer, labelled, all_ffns)
                timings["function_and_ablation"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - started
        self.timings_ = timings
        self.model_, self.tokenizer_ = model, tokenizer
        return self

    def _watched(self, all_ffns: list[FFN]) -> list[FFN]:
        if self.layers is None:
            return list(all_ffns)
        unknown = sorted(set(self.layers) - {f.index for f in all_ffns})
        if unknown:
            raise ConfigError(
                f"The 'layers' parameter of NeuronClusterer must list FFN indices in [0, {len(all_ffns) - 1}]. "
                f"Got {list(self.layers)} instead."
            )
        watched = [f for f in all_ffns if f.index in set(self.layers)]
        if self.across_layers and len(watched) < 2:
            raise ConfigError("across_layers needs at least two FFNs; widen 'layers'")
        return watched

    def _check_sizes(self, model: nn.Module) -> None:
        for ffn in self.ffns_:
            d_ff = ffn.modules(model)[2].in_features
            if self.method == "spectral" and self.n_clusters > d_ff:
                raise ConfigError(
                    f"The 'n_clusters' parameter of NeuronClusterer must be an int in [2, {d_ff}] "
                    f"({ffn.name} has {d_ff} neurons). Got {self.n_clusters} instead."
                )

    def _edge_fraction(self) -> float | None:
        if self.edge_fraction == "auto":
            return 0.02 if self.method == "louvain" else None
        return self.edge_fraction

    # ------------------------------------------------------------------------------------ collection

    def _collect(self, model: nn.Module, tokenizer: Any, calib: CalibrationData, all_ffns: list[FFN]):
        stats = [SecondMoments(of="h") if self.graph == "correlation" else CoActivation(top_fraction=self.top_fraction)]
        if self.shuffles > 0 or self.across_layers:
            stats.append(InputSample(self.shuffle_tokens, seed=self.seed))
        return collect(model, calib, stats, tokenizer=tokenizer, ffns=all_ffns, layers=[f.index for f in self.ffns_],
                       max_tokens=self.max_tokens, max_length=self.max_length, batch_size=self.batch_size,
                       progress=self.progress, threads=self.threads)

    def _unit_ffns(self) -> list[list[FFN]]:
        if not self.across_layers:
            return [[f] for f in self.ffns_]
        return [[a, b] for a, b in zip(self.ffns_, self.ffns_[1:]) if b.index == a.index + 1]

    def _sample_h(self, model: nn.Module, acts: Any, ffn: FFN) -> torch.Tensor:
        """(tokens, d_ff) neuron activations of the sampled tokens, recomputed from the sampled inputs."""
        return ffn_weights(model, ffn).hidden(acts.result(ffn.index, "inputs")["x"])

    def _blocks(self, model: nn.Module, samples: list[torch.Tensor], ffns: list[FFN]) -> dict:
        if self.graph == "correlation":
            return correlation(samples)
        markers = []
        for ffn, h in zip(ffns, samples):
            marker = ActiveCounts(top_fraction=self.top_fraction)
            marker.start(ffn, ffn_weights(model, ffn))
            markers.append(marker.markers(h))
        n = samples[0].shape[0]
        return {key: value / n for key, value in coactivation(markers).items()}  # rates: comparable across n

    def _graph(self, model: nn.Module, acts: Any, ffns: list[FFN], generator: torch.Generator | None,
               cache: dict[int, torch.Tensor] | None = None) -> NeuronGraph:
        """The unit's graph; with a generator, a shuffled copy (weights within matrices / tokens per neuron).
        `cache` keeps each FFN's sampled activations between the shuffles of a unit."""
        name = "FFN " + "+".join(str(f.index) for f in ffns)
        if self.graph == "weights":
            parts = []
            for ffn in ffns:
                w = ffn_weights(model, ffn)
                mats = [w.up, w.down, w.gate]
                if generator is not None:
                    mats = [None if m is None else permute_within(m, generator) for m in mats]
                parts.append((ffn.index, mats[0], mats[1], mats[2]))
            graph = weight_graph(parts, name)
        else:
            d_ff = [f.modules(model)[2].in_features for f in ffns]
            if generator is None and len(ffns) == 1:  # every token, streamed
                if self.graph == "correlation":
                    block = acts.result(ffns[0].index, "second_moments")["correlation"].abs()
                else:
                    block = acts.result(ffns[0].index, "coactivation")["counts"] / max(acts.tokens, 1)
                blocks = {(0, 0): block}
            else:  # the aligned token sample (same tokens in every FFN), permuted for shuffles
                cache = {} if cache is None else cache
                for f in ffns:
                    if f.index not in cache:
                        cache[f.index] = self._sample_h(model, acts, f)
                samples = [cache[f.index] for f in ffns]
                if generator is not None:
                    samples = [permute_tokens(s, generator) for s in samples]
                blocks = self._blocks(model, samples, ffns)
            graph = activation_graph(blocks, [f.index for f in ffns], d_ff, name)
        graph.adjacency = sparsify(graph.adjacency, self._edge_fraction())
        return graph

    def _partition_scores(self, graph: NeuronGraph, seed: int) -> tuple[np.ndarray, float, float]:
        adjacency = graph.adjacency
        sides = graph.kinds == "neuron" if self.graph == "weights" else None  # bipartite: neurons vs hidden dims
        labels = partition(adjacency, self.method, self.n_clusters, seed, self.resolution, sides)
        return labels, modularity(adjacency, labels, self.resolution), normalized_cut(adjacency, labels)

    def _cluster_units(self, model: nn.Module, acts: Any) -> list[GraphUnit]:
        groups = self._unit_ffns()
        units = []
        with progress_bar(len(groups) * (1 + self.shuffles), "cluster + shuffles", "graph",
                          enabled=self.progress) as bar:
            for u, ffns in enumerate(groups):
                cache: dict[int, torch.Tensor] = {}  # sampled activations, computed once per unit
                graph = self._graph(model, acts, ffns, None, cache)
                labels, q, ncut = self._partition_scores(graph, self.seed)
                bar.update(1)
                q_test = ShuffleTest("Q", q, [], higher_is_better=True)
                ncut_test = ShuffleTest("n-cut", ncut, [], higher_is_better=False)
                for s in range(self.shuffles):
                    generator = torch.Generator().manual_seed(self.seed * 1_000_003 + u * 1009 + s + 1)
                    shuffled = self._graph(model, acts, ffns, generator, cache)
                    _, q_s, ncut_s = self._partition_scores(shuffled, self.seed + s + 1)
                    q_test.shuffled.append(q_s)
                    ncut_test.shuffled.append(ncut_s)
                    bar.update(1)
                units.append(GraphUnit(tuple(f.index for f in ffns), graph, labels, q_test, ncut_test,
                                       "n-cut" if self.method == "spectral" else "Q"))
                log.info("%s: Q %.4f, n-cut %.4f", units[-1].name, q, ncut)
        return units

    def _clusters(self) -> list[Cluster]:
        clusters = []
        for u, unit in enumerate(self.units_):
            neurons = unit.graph.neuron_nodes()
            tag = "-".join(str(layer) for layer in unit.layers)
            for c in np.unique(unit.labels[neurons]):
                members = neurons[unit.labels[neurons] == c]
                per_layer = {
                    int(layer): np.sort(unit.graph.units[members[unit.graph.layers[members] == layer]])
                    for layer in unit.layers
                }
                per_layer = {k: v for k, v in per_layer.items() if len(v)}
                clusters.append(Cluster(f"L{tag}.C{int(c)}", u, int(c), per_layer))
        return clusters

    # ----------------------------------------------------------------------------- function ties

    def _tie_to_labels(self, model: nn.Module, tokenizer: Any, labelled: LabelledTexts, all_ffns: list[FFN]) -> None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        texts = TokenizedTexts(tokenizer, labelled.texts, self.max_length)
        n = len(labelled.texts)
        watched = {f.index for f in self.ffns_}
        per_text = {f.index: torch.zeros(n, f.modules(model)[2].in_features) for f in self.ffns_}
        embeddings = torch.zeros(n, int(model.config.hidden_size))
        state: dict[str, Any] = {}

        def record(ffn: FFN, h: torch.Tensor) -> torch.Tensor:
            if ffn.index in watched:
                mask = state["mask"].unsqueeze(-1).to(h.dtype)  # (batch, tokens, 1)
                per_text[ffn.index][state["rows"]] = ((h.abs() * mask).sum(1) / mask.sum(1).clamp(min=1)).float()
            return h

        batches = texts.by_length(self.batch_size)
        with torch.no_grad(), edit_neurons(model, record, ffns=all_ffns), progress_bar(
            n, "cluster activations", "text", enabled=self.progress
        ) as bar:
            for rows in batches:
                batch = texts.batch(rows)
                state["rows"], state["mask"] = rows, batch["attention_mask"]
                embeddings[rows] = pooled_states(model, {}, batch)
                bar.update(len(rows))
        # function: AP of each cluster's mean activation, per label
        y = labelled.labels
        self.label_names_ = labelled.label_names
        self.prevalence_ = np.array([(y == k).mean() for k in range(len(labelled.label_names))])
        self.function_ = np.zeros((len(self.clusters_), len(labelled.label_names)))
        self.cluster_activation_ = np.zeros((n, len(self.clusters_)))
        for c, cluster in enumerate(self.clusters_):
            total = sum(per_text[layer][:, idx].sum(1) for layer, idx in cluster.neurons.items())
            activation = (total / cluster.size).numpy()
            self.cluster_activation_[:, c] = activation
            for k in range(len(labelled.label_names)):
                self.function_[c, k] = average_precision(activation, y == k)
        self.labels_source_ = labelled.name
        if self.ablate:
            self._ablate(model, texts, labelled, embeddings, all_ffns)

    def _ablate(self, model: nn.Module, texts: TokenizedTexts, labelled: LabelledTexts, embeddings: torch.Tensor,
                all_ffns: list[FFN]) -> None:
        y = labelled.labels
        rng = np.random.default_rng(self.seed)
        probe_rows, eval_rows = stratified_halves(y, rng)  # the probe never sees the texts it is read on
        if not eval_rows:
            raise DataError("too few labelled texts to hold half out for ablations; give more")
        head = linear_probe(embeddings[probe_rows], y[probe_rows].tolist(), labelled.label_names, seed=self.seed)
        eval_texts = TokenizedTexts(texts.tokenizer, [labelled.texts[i] for i in eval_rows], self.max_length)
        eval_y = torch.as_tensor(y[eval_rows])
        d_ff = {f.index: f.modules(model)[2].in_features for f in all_ffns}

        def score(masks: dict[int, torch.Tensor]) -> tuple[float, float]:
            pooled = torch.zeros(len(eval_rows), embeddings.shape[1])
            with torch.no_grad(), neuron_masks(model, masks, ffns=all_ffns):
                for rows in eval_texts.by_length(self.batch_size * 2):
                    pooled[rows] = pooled_states(model, {}, eval_texts.batch(rows))
                logits = head(pooled)
            loss = float(nn.functional.cross_entropy(logits, eval_y))
            return float((logits.argmax(-1) == eval_y).float().mean()), loss

        def keep_all_but(neurons: dict[int, np.ndarray]) -> dict[int, torch.Tensor]:
            masks = {}
            for layer, idx in neurons.items():
                keep = torch.ones(d_ff[layer], dtype=torch.bool)
                keep[torch.as_tensor(idx, dtype=torch.long)] = False
                masks[layer] = keep
            return masks

        total = 1 + len(self.clusters_) * (1 + self.ablation_baselines)
        with progress_bar(total, "ablations", "eval", enabled=self.progress) as bar:
            self.full_accuracy_, self.full_loss_ = score({})
            bar.update(1)
            results = []
            for cluster in self.clusters_:
                accuracy, loss = score(keep_all_but(cluster.neurons))
                bar.update(1)
                random_drops, random_losses = [], []
                for _ in range(self.ablation_baselines):
                    sample = {layer: rng.choice(d_ff[layer], size=len(idx), replace=False)
                              for layer, idx in cluster.neurons.items()}
                    random_accuracy, random_loss = score(keep_all_but(sample))
                    random_drops.append(self.full_accuracy_ - random_accuracy)
                    random_losses.append(random_loss - self.full_loss_)
                    bar.update(1)
                drop, increase = self.full_accuracy_ - accuracy, loss - self.full_loss_
                mean, std, z = _against(drop, random_drops)
                loss_mean, loss_std, loss_z = _against(increase, random_losses)
                results.append({"cluster": cluster.id, "size": cluster.size, "accuracy": accuracy, "loss": loss,
                                "drop": drop, "loss_increase": increase,
                                "random_drops": random_drops, "random_mean": mean, "random_std": std, "z": z,
                                "random_loss_increases": random_losses, "random_loss_mean": loss_mean,
                                "random_loss_std": loss_std, "z_loss": loss_z})
        self.ablation_ = results
        self.probe_texts_, self.eval_texts_ = len(probe_rows), len(eval_rows)

    # ------------------------------------------------------------------------------------------ use

    def summary(self) -> dict[str, Any]:
        """Everything learned, as JSON-ready data (clusters.json)."""
        self.check_fitted()
        out: dict[str, Any] = {
            "params": {k: v for k, v in self.get_params().items() if k not in ("progress", "threads")},
            "source": str(self.source_) if self.source_ else None,
            "tokens": self.tokens_,
            "units": [u.summary() for u in self.units_],
            "clusters": [c.to_dict() for c in self.clusters_],
            "timings": self.timings_,
        }
        if self.function_ is not None:
            out["function"] = {
                "labels": list(self.label_names_),
                "prevalence": self.prevalence_.tolist(),
                "average_precision": {c.id: self.function_[i].tolist() for i, c in enumerate(self.clusters_)},
                "source": self.labels_source_,
            }
        if self.ablation_:
            out["ablation"] = {"full_accuracy": self.full_accuracy_, "full_loss": self.full_loss_,
                               "clusters": self.ablation_}
        return out
