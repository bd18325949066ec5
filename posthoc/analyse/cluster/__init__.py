"""Activation and weight clustering: neuron graphs, communities, modularity against shuffled baselines."""
