"""Subnetwork masks: the binary mask over frozen weights that a task needs (Csordás et al. 2021)."""
