"""Neuron clustering: graph kernels against independent computations, the analyser on a tiny BERT, its
outputs (GraphML, cluster mask modules) loaded back, the CLI, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from posthoc.cli import main
from tiny_text import CLASSES, make_tiny_bert, synthetic_corpus

from posthoc.analyse.activations import neuron_masks
from posthoc.analyse.calibration import CalibrationData
from posthoc.analyse.cluster.clusterer import NeuronClusterer, as_labelled, average_precision
from posthoc.analyse.cluster.graphs import (
    ShuffleTest,
    activation_graph,
    correlation,
    louvain_clusters,
    modularity,
    normalized_cut,
    permute_tokens,
    permute_within,
    spectral_clusters,
    to_networkx,
    weight_graph,
)
from posthoc.analyse.cluster.run import split_cluster
from posthoc.analyse.evaluate import pooled_states
from posthoc.analyse.texts import TokenizedTexts
from posthoc.errors import ConfigError, DataError
from posthoc.modules.masks import apply_mask, read_mask_module


def planted(n_per: int = 20, groups: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weighted graph with `groups` dense communities and weak edges between them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(groups), n_per)
    n = labels.size
    a = rng.random((n, n)) * 0.05 + (labels[:, None] == labels[None, :]) * rng.random((n, n))
    a = np.triu(a, 1)
    return (a + a.T).astype(np.float32), labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("resolution", [1.0, 0.5])
def test_modularity_matches_networkx(resolution):
    a, labels = planted()
    graph = to_networkx(a)
    communities = [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
    expected = nx.community.modularity(graph, communities, weight="weight", resolution=resolution)
    assert modularity(a, labels, resolution) == pytest.approx(expected, abs=1e-9)
    shuffled = np.random.default_rng(1).permutation(labels)
    expected = nx.community.modularity(
        graph, [set(np.flatnonzero(shuffled == c).tolist()) for c in np.unique(shuffled)], weight="weight"
    )
    assert modularity(a, shuffled) == pytest.approx(expected, abs=1e-9)


def test_normalized_cut_by_hand():
    # path 0-1-2-3 with weights 1, 2, 3; communities {0,1} and {2,3}: cut = 2
    a = np.zeros((4, 4))
    for i, j, w in [(0, 1, 1.0), (1, 2, 2.0), (2, 3, 3.0)]:
        a[i, j] = a[j, i] = w
    labels = np.array([0, 0, 1, 1])
    vol = [1 + 3, 5 + 3]  # degrees: 1, 3, 5, 3
    assert normalized_cut(a, labels) == pytest.approx(2 / vol[0] + 2 / vol[1])


def test_spectral_and_louvain_recover_planted_communities():
    a, labels = planted()
    assert same_partition(spectral_clusters(a, 3, seed=0), labels)
    assert same_partition(louvain_clusters(a, seed=0), labels)
    with pytest.raises(ConfigError, match="cannot cut a graph of 60 nodes into 61"):
        spectral_clusters(a, 61)


def test_weight_graph_blocks_are_the_absolute_weights():
    torch.manual_seed(0)
    up, down, gate = torch.randn(6, 3), torch.randn(3, 6), torch.randn(6, 3)
    g = weight_graph([(2, up, down, None)])
    assert g.size == 3 + 6 + 3 and list(g.kinds).count("neuron") == 6
    assert np.allclose(g.adjacency[3:9, 0:3], up.abs().numpy())  # neurons x inputs
    assert np.allclose(g.adjacency[9:12, 3:9], down.abs().numpy())  # outputs x neurons
    assert np.allclose(g.adjacency, g.adjacency.T) and np.all(np.diag(g.adjacency) == 0)
    assert np.all(g.adjacency[0:3, 9:12] == 0)  # no input-output edge
    glu = weight_graph([(0, up, down, gate), (1, up, down, None)])
    assert glu.size == 3 + 2 * (6 + 3)
    assert np.allclose(glu.adjacency[3:9, 0:3], (up.abs() + gate.abs()).numpy())
    assert list(glu.kinds[9:12]) == ["residual"] * 3 and set(glu.layers[12:18]) == {1}


def test_correlation_blocks_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    y = x[:, :3] * 2 + rng.standard_normal((200, 3))
    blocks = correlation([torch.from_numpy(x), torch.from_numpy(y)])
    full = np.abs(np.corrcoef(np.concatenate([x, y], 1).T))
    assert np.allclose(blocks[(0, 0)].numpy(), full[:5, :5], atol=1e-6)
    assert np.allclose(blocks[(0, 1)].numpy(), full[:5, 5:], atol=1e-6)
    g = activation_graph(blocks, [0, 1], [5, 3])
    expected = full.copy()
    np.fill_diagonal(expected, 0)
    assert np.allclose(g.adjacency, expected, atol=1e-6)


def test_shuffles_keep_the_values():
    gen = torch.Generator().manual_seed(0)
    m = torch.arange(12.0).reshape(3, 4)
    p = permute_within(m, gen)
    assert sorted(p.reshape(-1).tolist()) == m.reshape(-1).tolist() and not torch.equal(p, m)
    s = torch.randn(50, 4)
    t = permute_tokens(s, gen)
    for j in range(4):
        assert torch.equal(t[:, j].sort().values, s[:, j].sort().values)
    assert abs(float(torch.corrcoef(torch.stack([t[:, 0], s[:, 0]]))[0, 1])) < 0.5


def test_shuffle_test_statistics_by_hand():
    q = ShuffleTest("Q", 0.5, [0.1, 0.2, 0.3, 0.6])
    assert q.mean == pytest.approx(0.3) and q.std == pytest.approx(np.std([0.1, 0.2, 0.3, 0.6], ddof=1))
    assert q.z == pytest.approx((0.5 - 0.3) / q.std)
    assert q.beats == pytest.approx(0.75) and q.p_value == pytest.approx(2 / 5)
    cut = ShuffleTest("n-cut", 1.0, [2.0, 3.0, 4.0], higher_is_better=False)
    assert cut.beats == 1.0 and cut.p_value == pytest.approx(1 / 4) and cut.z < 0


def test_average_precision_by_hand():
    # ranking: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): AP = (1/1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0.1, 0.9]), np.array([1, 0])) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ analyser


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("cluster") / "base")


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(per_class=12)


@pytest.fixture(scope="module")
def fitted(tiny, corpus) -> NeuronClusterer:
    return NeuronClusterer(n_clusters=4, shuffles=3, progress=False, threads=1, max_label_texts=40,
                           ablation_baselines=2).fit(tiny, corpus, labels=corpus)


def test_weight_clusters_partition_the_neurons_and_scores_are_recomputable(fitted):
    assert [u.layers for u in fitted.units_] == [(0,), (1,)]
    for u, unit in enumerate(fitted.units_):
        members = np.concatenate([c.neurons[unit.layers[0]] for c in fitted.clusters_ if c.unit == u])
        assert sorted(members.tolist()) == list(range(64))  # every neuron in exactly one cluster
        assert unit.q.real == pytest.approx(modularity(unit.graph.adjacency, unit.labels))
        assert unit.ncut.real == pytest.approx(normalized_cut(unit.graph.adjacency, unit.labels))
        assert len(unit.q.shuffled) == 3 and unit.modular is False  # 3 shuffles can never give p <= 0.05
    assert fitted.function_.shape == (len(fitted.clusters_), len(CLASSES))
    assert np.all((fitted.function_ >= 0) & (fitted.function_ <= 1))
    assert len(fitted.ablation_) == len(fitted.clusters_) and all(len(r["random_drops"]) == 2 for r in fitted.ablation_)
    for r in fitted.ablation_:  # costs are against the full model; z against the random sets of the same size
        assert r["loss_increase"] == pytest.approx(r["loss"] - fitted.full_loss_)
        increases = r["random_loss_increases"]
        assert r["random_loss_mean"] == pytest.approx(np.mean(increases))
        if np.std(increases) > 0:
            assert r["z_loss"] == pytest.approx((r["loss_increase"] - np.mean(increases)) / np.std(increases, ddof=1))


def test_cluster_activation_is_the_mean_abs_activation_of_its_neurons(fitted, corpus):
    """Independent: capture h with a plain forward hook and average |h| over the text's tokens and neurons."""
    model, tok = fitted.model_, fitted.tokenizer_
    kept = as_labelled(corpus, None, fitted.max_label_texts, fitted.seed)  # the texts fit used, in its order
    for c in (0, len(fitted.clusters_) - 1):
        (layer, idx), = fitted.clusters_[c].neurons.items()
        captured = []
        handle = model.get_submodule(fitted.ffns_[layer].down).register_forward_pre_hook(
            lambda m, args, out=captured: out.append(args[0][0].detach()))
        with torch.no_grad():
            for text in kept.texts[:3]:
                model(**tok(text, return_tensors="pt"))
        handle.remove()
        expected = [float(h[:, idx].abs().mean()) for h in captured]
        assert fitted.cluster_activation_[:3, c] == pytest.approx(expected, rel=1e-4)


def test_correlation_graph_matches_activations_captured_directly(tiny, corpus):
    c = NeuronClusterer(graph="correlation", n_clusters=3, shuffles=2, progress=False, threads=1,
                        layers=[1]).fit(tiny, corpus)
    model, tok = c.model_, c.tokenizer_
    hs = []
    handle = model.get_submodule(c.ffns_[0].down).register_forward_pre_hook(lambda m, a: hs.append(a[0][0].detach()))
    with torch.no_grad():
        for text in corpus.texts:
            model(**tok(text, truncation=True, max_length=128, return_tensors="pt"))
    handle.remove()
    h = torch.cat(hs).double().numpy()
    expected = np.abs(np.nan_to_num(np.corrcoef(h.T)))
    np.fill_diagonal(expected, 0)
    assert c.tokens_ == h.shape[0]
    assert np.allclose(c.units_[0].graph.adjacency, expected, atol=1e-4)


def test_across_layers_and_coactivation(tiny, corpus):
    c = NeuronClusterer(graph="coactivation", across_layers=True, method="louvain", shuffles=2, progress=False,
                        threads=1).fit(tiny, corpus, labels=[CLASSES[y] for y in corpus.labels])
    assert [u.layers for u in c.units_] == [(0, 1)] and c.units_[0].graph.size == 128
    assert any(len(cl.neurons) == 2 for cl in c.clusters_) or len(c.clusters_) > 1
    assert c.function_ is not None and c.ablation_


def test_cluster_module_removes_exactly_the_cluster(fitted, tiny, corpus, tmp_path):
    out = split_cluster(tiny, tmp_path / "out", corpus, labels=corpus, n_clusters=4, shuffles=2, progress=False,
                        threads=1, max_label_texts=20, ablation_baselines=0)
    cluster = out.clusters_[1]
    module = tmp_path / "out" / "modules" / cluster.id
    manifest, masks = read_mask_module(module)
    (layer, idx), = cluster.neurons.items()
    assert manifest.kind == "mask" and torch.equal(torch.nonzero(masks[f"ffn.{layer}.neurons"]).reshape(-1),
                                                   torch.as_tensor(idx))
    pruned = apply_mask(tiny, module, tmp_path / "removed", mode="remove", progress=False)
    from transformers import AutoModel, AutoTokenizer

    ablated = AutoModel.from_pretrained(pruned).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    texts = TokenizedTexts(tok, corpus.texts[:6], 64)
    batch = texts.batch(list(range(6)))
    keep = torch.ones(64, dtype=torch.bool)
    keep[torch.as_tensor(idx)] = False
    with torch.no_grad(), neuron_masks(out.model_, {layer: keep}):
        expected = pooled_states(out.model_, {}, batch)
    assert torch.allclose(pooled_states(ablated, {}, batch), expected, atol=1e-5)
    # outputs: report, json, GraphML with clusters as node attributes
    summary = json.loads((tmp_path / "out" / "clusters.json").read_text())
    assert len(summary["clusters"]) == len(out.clusters_) and (tmp_path / "out" / "report.html").is_file()
    g = nx.read_graphml(tmp_path / "out" / "graphs" / "FFN_0.graphml")
    assert {d["kind"] for _, d in g.nodes(data=True)} == {"input", "neuron", "output"}
    assert all("cluster" in d for _, d in g.nodes(data=True))


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input(tiny, corpus):
    fast = {"shuffles": 0, "progress": False, "threads": 1}
    with pytest.raises(DataError, match="3 labels for 60 calibration texts"):
        NeuronClusterer(**fast).fit(tiny, corpus, labels=["a", "b", "a"])
    with pytest.raises(DataError, match="only one class"):
        NeuronClusterer(**fast).fit(tiny, corpus, labels=["x"] * len(corpus))
    with pytest.raises(DataError, match="carry no labels"):
        NeuronClusterer(**fast).fit(tiny, corpus, labels=CalibrationData(corpus.texts[:4], name="plain"))
    with pytest.raises(ConfigError, match=r"'n_clusters' parameter of NeuronClusterer must be an int in \[2, 64\]"):
        NeuronClusterer(n_clusters=65, **fast).fit(tiny, corpus)
    with pytest.raises(DataError, match="calibration data holds no text"):
        NeuronClusterer(graph="correlation", **fast).fit(tiny, [])
    with pytest.raises(DataError, match="needs calibration data"):
        NeuronClusterer(graph="correlation", **fast).fit(tiny, None)
    with pytest.raises(ConfigError, match=r"'layers' parameter of NeuronClusterer must list FFN indices in \[0, 1\]"):
        NeuronClusterer(layers=[5], **fast).fit(tiny)
    with pytest.raises(ConfigError, match="The 'shuffles' parameter of NeuronClusterer must be an int >= 0. Got -1"):
        NeuronClusterer(shuffles=-1).fit(tiny)
    with pytest.raises(ConfigError, match="has no parameter 'k'"):
        NeuronClusterer(k=3)


def _folders(root: Path, per_class: int = 8, classes: tuple[str, ...] = CLASSES) -> Path:
    data = synthetic_corpus(per_class=per_class)
    for i, (text, y) in enumerate(zip(data.texts, data.labels)):
        if data.label_names[y] in classes:
            folder = root / data.label_names[y]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:03d}.txt").write_text(text)
    return root


def test_cli_cluster_end_to_end_and_bad_input(tiny, tmp_path):
    data = _folders(tmp_path / "data")
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["split", "cluster", str(tiny), str(out), "--calib", f"folders:{data}", "--labels",
                                  f"folders:{data}", "--n-clusters", "3", "--shuffles", "2", "--ablation-baselines", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "0 of 2 units are more modular" in result.output and (out / "report.html").is_file()
    assert len(list((out / "modules").iterdir())) == len(json.loads((out / "clusters.json").read_text())["clusters"])
    # K larger than the neurons: one line, exit 2, nothing written
    bad = tmp_path / "bad"
    result = runner.invoke(main, ["split", "cluster", str(tiny), str(bad), "--n-clusters", "500", "--quiet"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "n_clusters" in result.output
    assert not bad.exists()
    one = _folders(tmp_path / "one", classes=("alpha",))
    result = runner.invoke(main, ["split", "cluster", str(tiny), str(bad), "--labels", f"folders:{one}", "--quiet"])
    assert result.exit_code == 2 and "only one class" in result.output and not bad.exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = runner.invoke(main, ["split", "cluster", str(tiny), str(bad), "--graph", "correlation", "--calib",
                                  str(empty), "--quiet"])
    assert result.exit_code == 2 and "holds no text" in result.output and not bad.exists()
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    result = runner.invoke(main, ["split", "cluster", str(tiny), str(bad), "--calib", f"folders:{data}",
                                  "--label-file", str(labels), "--quiet"])
    assert result.exit_code == 2 and "2 labels for 40 calibration texts" in result.output and not bad.exists()


@pytest.mark.real
def test_minilm_weight_clusters_with_bbc_labels():
    """all-MiniLM-L6-v2, one FFN: clusters cover its 1536 neurons, scores recompute, ablation runs."""
    from posthoc.assets import minilm_dir

    c = NeuronClusterer(layers=[2], n_clusters=6, shuffles=2, max_label_texts=30, ablation_baselines=1,
                        max_length=48, progress=False).fit(minilm_dir(), labels="bbc:test")
    unit = c.units_[0]
    assert unit.graph.size == 384 + 1536 + 384
    assert sorted(np.concatenate([cl.neurons[2] for cl in c.clusters_]).tolist()) == list(range(1536))
    assert unit.q.real == pytest.approx(modularity(unit.graph.adjacency, unit.labels))
    assert c.label_names_ == ("business", "entertainment", "politics", "sports", "tech")
    assert c.full_accuracy_ > 0.6 and len(c.ablation_) == len(c.clusters_)
