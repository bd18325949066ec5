"""The analysers posthoc has, by the name of their `posthoc split` command.

    ANALYSERS["moe"]            # MoEfier: every FFN split into experts with routers
    analyser("cluster")         # NeuronClusterer; an unknown name lists the valid ones

Each keeps the contract of `posthoc.analyse.base.Analyser`; `tests/test_analysers.py` checks it for every
entry here.
"""

from __future__ import annotations

from posthoc.analyse.base import Analyser
from posthoc.analyse.cluster.clusterer import NeuronClusterer
from posthoc.analyse.masks.masker import SubnetworkMasker
from posthoc.analyse.moe.moefier import MoEfier
from posthoc.errors import ConfigError

ANALYSERS: dict[str, type[Analyser]] = {"moe": MoEfier, "cluster": NeuronClusterer, "mask": SubnetworkMasker}


def analyser(name: str) -> type[Analyser]:
    if name not in ANALYSERS:
        raise ConfigError(f"no analyser {name!r}; analysers: {', '.join(ANALYSERS)}")
    return ANALYSERS[name]
