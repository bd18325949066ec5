"""Subnetwork masks: the binary mask over frozen weights that a task needs (Csordás et al. 2021).

    from posthoc.analyse.masks import SubnetworkMasker   # for users; inside posthoc import from .masker

masker (the analyser), report, run (`posthoc split mask`)."""

from posthoc.analyse.masks.masker import SubnetworkMasker

__all__ = ["SubnetworkMasker"]
