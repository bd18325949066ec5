"""Activation and weight clustering: neuron graphs, communities, modularity against shuffled baselines.

    from posthoc.analyse.cluster import NeuronClusterer   # for users; inside posthoc import from .clusterer

clusterer (the analyser), graphs (neuron graphs, partitions, shuffle tests), report, run (`posthoc split cluster`)."""

from posthoc.analyse.cluster.clusterer import NeuronClusterer

__all__ = ["NeuronClusterer"]
