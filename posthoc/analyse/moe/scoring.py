"""Score an MoE-fied model against its dense self: quality vs fraction of experts, router recall, speed.

Quality is measured on held-out text (never the calibration text):
    encoders   mean cosine of mean-pooled sentence embeddings to the dense model's, and, with labelled
               data, the accuracy of a linear probe trained on *dense* embeddings (of the calibration
               texts) read on the MoE embeddings of the held-out texts;
    decoders   perplexity (and its ratio to the dense perplexity).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posthoc.analyse.activations import edit_neurons
from posthoc.analyse.calibration import CalibrationData, is_causal_lm
from posthoc.analyse.evaluate import mean_cosine, perplexity, sentence_embeddings
from posthoc.analyse.moe.layers import MoEFFN, install_moe, moe_layers, restore
from posthoc.ffn import find_ffns, neuron_scores
from posthoc.finetune import linear_probe

FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


@contextmanager
def moe_installed(moe: Any, model: nn.Module, *, router: str | None = None, top_k: int | None = None,
                  healed: bool = True, permuted: bool = False) -> Iterator[list[MoEFFN]]:
    """`model` with MoE layers inside the block, dense again after it."""
    originals = []
    try:
        for i, ffn in enumerate(moe.ffns_):
            layer = moe.build_layer(model, i, permuted=permuted, router=router, top_k=top_k, healed=healed)
            originals.append(install_moe(model, ffn, layer))
        yield moe_layers(model)
    finally:
        for o in reversed(originals):
            restore(model, o)


@dataclass
class Scorer:
    """Scores a model on held-out data against the dense reference computed at construction."""

    model: nn.Module
    tokenizer: Any
    held_out: CalibrationData
    probe_data: CalibrationData | None = None
    max_length: int = 128
    max_tokens: int = 16_384
    dense: dict[str, float] = field(default_factory=dict)
    cache: Any = None  # a file (…/name.pt) to keep the dense reference between runs (benchmarks)

    def __post_init__(self) -> None:
        self.causal = is_causal_lm(self.model)
        self._reference: torch.Tensor | None = None
        self._probe = None
        start = time.perf_counter()
        if self.cache is not None and Path(self.cache).is_file():
            saved = torch.load(self.cache, weights_only=False)
            self.dense, self._reference, self._probe = saved["dense"], saved["reference"], saved["probe"]
            self.seconds_per_score = saved["seconds"]
            return
        if self.causal:
            self.dense = {"perplexity": self._perplexity()}
        else:
            self._reference = self._embed(self.held_out.texts)
            self.dense = {"cosine": 1.0}
            if self.probe_data is not None and self.probe_data.labels is not None and self.held_out.labels is not None:
                train = self._embed(self.probe_data.texts)
                self._probe = linear_probe(train, self.probe_data.labels, self.probe_data.label_names)
                self.dense["probe_accuracy"] = self._probe.accuracy(self._reference, self.held_out.labels)
        self.seconds_per_score = time.perf_counter() - start
        if self.cache is not None:
            torch.save({"dense": self.dense, "reference": self._reference, "probe": self._probe,
                        "seconds": self.seconds_per_score}, self.cache)

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        return sentence_embeddings(self.model, self.tokenizer, texts, max_length=self.max_length)

    def _perplexity(self) -> float:
        return perplexity(self.model, self.tokenizer, self.held_out, max_length=self.max_length,
                          max_tokens=self.max_tokens)

    def score(self) -> dict[str, float]:
        """The model's current quality (call it with MoE layers installed)."""
        if self.causal:
            ppl = self._perplexity()
            return {"perplexity": ppl, "perplexity_ratio": ppl / self.dense["perplexity"]}
        emb = self._embed(self.held_out.texts)
        out = {"cosine": mean_cosine(emb, self._reference)}
        if self._probe is not None:
            acc = self._probe.accuracy(emb, self.held_out.labels)
            out.update({"probe_accuracy": acc, "probe_retained": acc / self.dense["probe_accuracy"]})
        return out

    @property
    def headline(self) -> str:
        return "perplexity" if self.causal else "cosine"


@contextmanager
def per_neuron_oracle(model: nn.Module, fraction: float, *, score: str = "output") -> Iterator[None]:
    """Every token keeps only its top `fraction` of FFN neurons by score (the bound for any router at that
    budget: no expert granularity, perfect routing). Dense compute: for evaluation only."""
    ffns = find_ffns(model)
    norms = {f.index: f.modules(model)[2].weight.detach().float().norm(dim=0) for f in ffns}

    def keep_top(ffn: Any, h: torch.Tensor) -> torch.Tensor:
        k = max(1, round(fraction * h.shape[-1]))
        s = neuron_scores(h, norms[ffn.index], score)
        mask = torch.zeros_like(h).scatter_(-1, s.topk(k, dim=-1).indices, 1.0)
        return h * mask

    with edit_neurons(model, keep_top, ffns=ffns):
        yield


def ks_for(experts: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    return sorted({max(1, min(experts, round(f * experts))) for f in fractions})


def sweep(moe: Any, model: nn.Module, scorer: Scorer, *, routers: Sequence[str] = ("oracle", "centroid", "mlp"),
          ks: Sequence[int] | None = None, healed: bool = True, label: str = "") -> list[dict[str, Any]]:
    """Quality at each k for each router (uniform k in every layer). Rows: router, k, fraction, scores."""
    experts = len(moe.sizes_[0])
    rows = []
    for router in routers:
        if router != "oracle" and router not in moe.routers_[0]:
            continue
        with moe_installed(moe, model, router=router, top_k=experts, healed=healed) as layers:
            for k in ks or ks_for(experts):
                for layer in layers:
                    layer.set_routing(top_k=k, routing="topk")
                rows.append({"label": label, "router": router, "k": k, "fraction": k / experts,
                             "neurons": active_fraction(layers), **scorer.score()})
    return rows


def active_fraction(layers: Sequence[MoEFFN]) -> float:
    """Mean fraction of FFN neurons computed per token under top-k routing (shared neurons included)."""
    fractions = []
    for layer in layers:
        mean_size = sum(layer.sizes) / len(layer.sizes)
        fractions.append((layer.shared + layer.top_k * mean_size) / layer.d_ff)
    return sum(fractions) / len(fractions)


def measured_fraction(layers: Sequence[MoEFFN]) -> float | None:
    """Mean fraction of FFN neurons computed per token over what the layers routed since they were built
    (threshold routing computes a variable number of experts per token); None before any token."""
    if not all(layer.seen[0] for layer in layers):
        return None
    fractions = []
    for layer in layers:
        mean_size = sum(layer.sizes) / len(layer.sizes)
        fractions.append((layer.shared + layer.seen[1] / layer.seen[0] * mean_size) / layer.d_ff)
    return sum(fractions) / len(fractions)


@torch.inference_mode()
def time_ffn(layer: MoEFFN, dense: Any, x: torch.Tensor, *, repeats: int = 10) -> dict[str, float]:
    """Milliseconds per call (median of `repeats`) of `dense` (the original FFN as a callable, e.g.
    `FFNWeights`) and of the MoE layer, on the same tokens x (T, d)."""
    def median_ms(fn: Any) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * sorted(times)[len(times) // 2]

    dense_ms, moe_ms = median_ms(lambda: dense(x)), median_ms(lambda: layer(x))
    return {"dense_ms": dense_ms, "moe_ms": moe_ms, "speedup": dense_ms / moe_ms}
