"""MoE-fication: every FFN split into experts plus a router (Zhang et al. 2022).

    from posthoc.analyse.moe import MoEfier      # for users; inside posthoc import from posthoc.analyse.moe.moefier

moefier (the analyser), layers (MoE layers and routers), partition, heal, io (the output files), scoring,
report, run (`posthoc split moe`)."""

from posthoc.analyse.moe.moefier import MoEError, MoEfier

__all__ = ["MoEError", "MoEfier"]
