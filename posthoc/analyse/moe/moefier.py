"""MoE-fication (Zhang et al. 2022) of trained dense transformers, for ReLU, GELU and SwiGLU FFNs.

    moe = MoEfier(experts=16, top_k=4, partition="kmeans", router="mlp").fit(model_dir, "bbc:train")
    moe.save(out_dir)                    # dense checkpoint (neurons permuted) + routers + partition
    model = posthoc.load(out_dir, top_k=4)

What `fit` does, per FFN (one streaming pass over the calibration text collects everything):
1. statistics: neuron moments, how often each neuron is among a token's most active (shared expert,
   co-activation graph), and a uniform sample of FFN inputs x (routers, budgets, compensation);
2. shared expert (optional): the `shared` fraction of neurons most often among a token's top neurons
   (CMoE) are computed for every token;
3. partition of the other neurons into E experts (`posthoc.analyse.moe.partition`);
4. routers on the sampled inputs: the centroid router (free), for GLU FFNs the gate router (free: the
   FFN's own gate activations, see `GateRouter`) and, if asked, MoEfication's MLP router trained to
   predict every expert's activation mass (normalised by the token's largest), 90/10 split with early
   stopping; the oracle needs no training (it computes every neuron: evaluation only);
5. levers for non-ReLU models: per-layer budgets (greedy on the relative output error), threshold
   routing (a variable number of experts per token at the same average), compensation of skipped
   experts by their calibration-mean output; then optional healing (`posthoc.analyse.moe.heal`).

Neuron activation is defined once, in `posthoc.ffn` (magnitude |h| or output-aware |h|·‖W_down‖).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posthoc.analyse.activations import Activations, ActiveCounts, CoActivation, InputSample, Moments, collect
from posthoc.analyse.base import Analyser, frozen
from posthoc.analyse.calibration import CalibrationData
from posthoc.analyse.moe.heal import heal, heal_layers
from posthoc.analyse.moe.io import read_output, write_output
from posthoc.analyse.moe.layers import (
    HEALED_THRESHOLD,
    ROUTERS,
    ROUTINGS,
    CentroidRouter,
    GateRouter,
    MLPRouter,
    MoEFFN,
    calibrate_threshold,
    install_moe,
    unit_scores,
)
from posthoc.analyse.moe.partition import PARTITIONS, expert_sizes, order_from_labels, partition_neurons
from posthoc.analyse.params import Param, ParamTable, choice, is_int, is_number
from posthoc.errors import ConfigError, DataError
from posthoc.ffn import SCORES, FFNWeights, ffn_weights, find_ffns, neuron_scores
from posthoc.modules.format import ModuleError
from posthoc.threads import torch_threads

log = logging.getLogger(__name__)

PARAMS = ParamTable("MoEfier", [
    Param("experts", 16, "an int >= 1", lambda v, p: is_int(v) and v >= 1, "Routed experts per FFN.", int),
    Param("top_k", 4, "an int in [1, experts]", lambda v, p: is_int(v) and 1 <= v <= p.get("experts", 16),
          "Experts computed per token (the average, with threshold routing or per-layer budgets).", int),
    choice("partition", "kmeans", PARTITIONS, "How neurons are grouped into experts."),
    choice("router", "mlp", ROUTERS, "Router used at run time: gate (GLU FFNs only, no training) scores experts from "
           "the FFN's own gate activations, computed for every neuron and reused; oracle computes every neuron "
           "(evaluation only)."),
    choice("kernel", "grouped", ("grouped", "masked"),
           "Gate router: grouped computes only the chosen experts; masked computes the same function densely "
           "with a mask (evaluation of very fine experts, e.g. one neuron each: no speed-up)."),
    Param("gate_up_scale", False, "a bool", lambda v, p: isinstance(v, bool),
          "Gate router: weight each neuron's |gate| by the calibration RMS of its up projection too (estimates "
          "|h| rather than |act(gate)|).", bool),
    Param("shared", 0.0, "a number in [0, 1)", lambda v, p: is_number(v) and 0 <= v < 1,
          "Fraction of neurons in an always-on shared expert (the most often active ones).", float),
    choice("score", "magnitude", SCORES, "Neuron activation score: |h| or output-aware |h|·‖W_down column‖."),
    choice("routing", "topk", ROUTINGS, "topk: k experts per token; threshold: a variable number at the same average."),
    choice("layer_budget", "uniform", ("uniform", "greedy"),
           "greedy: more experts where the measured output error (relative to the layer's output) is largest, same total."),
    Param("compensation", False, "a bool", lambda v, p: isinstance(v, bool),
          "Add the calibration-mean output of skipped experts (FLAP-style bias).", bool),
    Param("lora_rank", 0, "an int >= 0", lambda v, p: is_int(v) and v >= 0,
          "Rank of a linear term parallel to each MoE FFN that predicts what the skipped experts add: fitted "
          "by reduced-rank regression on the calibration inputs, refined by healing (0: none).", int),
    Param("layer_heal_epochs", 0, "an int >= 0", lambda v, p: is_int(v) and v >= 0,
          "Epochs of layer-wise distillation (FFN output MSE on the cached calibration inputs) of routers, "
          "expert scales and LoRA: cheap, no backpropagation through the model.", int),
    Param("layer_heal_ffn_lr", 0.0, "a number >= 0", lambda v, p: is_number(v) and v >= 0,
          "Rate for the experts' own matrices in the layer-wise phase (0: frozen there); 1e-3 measured on "
          "MiniLM (the largest single healing gain found there).", float),
    Param("heal_steps", 0, "an int >= 0", lambda v, p: is_int(v) and v >= 0,
          "Steps of whole-model distillation of routers, expert scales (and LoRA) towards the dense model.", int),
    Param("heal_lr", 1e-4, "a number > 0", lambda v, p: is_number(v) and v > 0,
          "Healing rate of routers, expert scales, compensation, LoRA and biases, in the layer-wise phase and "
          "the whole-model steps (there cosine-decayed to a tenth). Measured on MiniLM: 3e-5…3e-4 "
          "within 0.003 of cosine, 1e-3 −0.015, 3e-3 −0.027 (Adam's first steps shake the model), 1e-2 diverges.", float),
    Param("heal_batch_size", 8, "an int >= 1", lambda v, p: is_int(v) and v >= 1, "Sequences per healing step.", int),
    Param("heal_tokens", None, "None or an int >= 1", lambda v, p: v is None or (is_int(v) and v >= 1),
          "Calibration tokens the healing steps cycle through (default: max_tokens).", int),
    Param("heal_hidden", 0.0, "a number >= 0", lambda v, p: is_number(v) and v >= 0,
          "Weight of every layer's hidden-state error (relative squared error to the dense model's) in the "
          "healing loss, added to the output loss (0: output loss only).", float),
    Param("heal_biases", False, "a bool", lambda v, p: isinstance(v, bool),
          "Healing also trains the FFN biases of the MoE layers (stored with the healing state; the dense "
          "checkpoint is unchanged).", bool),
    Param("heal_ffn_lr", 0.0, "a number >= 0", lambda v, p: is_number(v) and v >= 0,
          "Learning rate of the experts' own matrices during healing (0: frozen; e.g. 1e-4 trains them, and the "
          "healing state then holds a copy of every FFN's weights; the dense checkpoint is unchanged).", float),
    Param("max_tokens", 50_000, "an int >= 1", lambda v, p: is_int(v) and v >= 1,
          "Calibration tokens streamed through the model.", int),
    Param("router_tokens", 20_000, "an int >= 64", lambda v, p: is_int(v) and v >= 64,
          "FFN inputs sampled per layer to train and check routers.", int),
    Param("router_epochs", 30, "an int >= 1", lambda v, p: is_int(v) and v >= 1, "MLP router epochs.", int),
    Param("router_hidden", None, "None or an int >= 1", lambda v, p: v is None or (is_int(v) and v >= 1),
          "MLP router hidden width (None: the number of experts, as MoEfication).", int),
    Param("coactivation_fraction", 0.1, "a number in (0, 1]", lambda v, p: is_number(v) and 0 < v <= 1,
          "A neuron is active on a token when among the token's top fraction of scores.", float),
    choice("kmeans_rows", "gate", ("gate", "up", "both"), "GLU FFNs: which first-matrix rows k-means and the centroid router use."),
    Param("max_length", 128, "an int >= 8", lambda v, p: is_int(v) and v >= 8, "Tokens per calibration sequence.", int),
    Param("batch_size", 16, "an int >= 1", lambda v, p: is_int(v) and v >= 1, "Sequences per forward pass.", int),
    Param("seed", 0, "an int", lambda v, p: is_int(v), "Seed of partitions, samples and training.", int),
    Param("ffn_modules", None, "None or 'up=P,down=P[,gate=P][,act=NAME]'",
          lambda v, p: v is None or isinstance(v, (str, dict)),
          "FFN modules of models posthoc does not know: 'up=PATH,down=PATH[,gate=PATH][,act=NAME]', * standing "
          "for the layer number (e.g. up=model.decoder.layers.*.fc1,down=model.decoder.layers.*.fc2,act=relu).", str),
    Param("progress", True, "a bool", lambda v, p: isinstance(v, bool), "Show progress bars.", bool, cli=False),
    Param("threads", None, "None or an int >= 1", lambda v, p: v is None or (is_int(v) and v >= 1), "torch threads.", int),
])


class MoEError(ModuleError):
    """An MoE-fication output is missing, malformed, or from another posthoc version."""


class MoEfier(Analyser, params=PARAMS):
    """Split every FFN of a trained dense transformer into experts with routers (the analyser contract of
    `posthoc.analyse.base`: parameters in PARAMS, learned state in attributes ending in `_`).

    Learned attributes (after `fit`): ffns_, orders_ (per FFN: new position j holds original neuron
    orders_[l][j]), sizes_ (routed expert sizes), shared_ (always-on neurons, first in the order),
    routers_ ({"centroid": module, "mlp": module}), top_k_ and thresholds_ (per FFN), compensation_
    ((E, d) per FFN or None), heal_state_ (per FFN, what healing trained: expert scales, LoRA, …; {} when
    not healed), heal_log_ (the whole-model healing's losses and timings, or None), recall_ (router recall
    of the oracle's mass per FFN and router), router_curves_, layer_errors_ (greedy budgets), speed_inputs_
    (real inputs of the first FFN, for speed measurements; not saved), tokens_, calibration_, timings_,
    model_type_, source_ (checkpoint directory, when fitted from one). `load` adds ffn_specs_, manifest_, info_.
    """

    # ------------------------------------------------------------------------------------------ fit

    def fit(self, model: Any, data: Any, *, tokenizer: Any = None, activations: Activations | None = None) -> MoEfier:
        """Learn partitions and routers. model: a checkpoint spec (directory, GGUF, hub id) or a loaded
        transformers model (then pass `tokenizer`; it is left as it was); data: calibration texts (see
        `load_calibration`).

        activations: statistics already collected on `data` (`collect(..., self.statistics())` or a
        superset): several MoEfiers with different settings then share one pass over the text."""
        self.validate_params()
        started = time.perf_counter()
        model, tokenizer = self.model_for_fit(model, tokenizer)
        data = CalibrationData.of(data)
        if len(data) == 0:
            raise DataError("calibration data holds no text")
        self.ffns_ = find_ffns(model, self.ffn_modules)
        self._check_shapes(model)
        timings: dict[str, float] = {}
        with frozen(model), torch_threads(self.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            t0 = time.perf_counter()
            acts = self._collect(model, tokenizer, data) if activations is None else self._check_activations(activations)
            timings["collect"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._fit_layers(model, acts)
            timings["partition_and_routers"] = time.perf_counter() - t0
            if self.layer_heal_seconds_:
                timings["layer_heal"] = self.layer_heal_seconds_
                timings["layer_heal_cpu"] = self.layer_heal_cpu_seconds_
            self.heal_log_ = None
            if self.heal_steps > 0 and self.router != "oracle":
                t0 = time.perf_counter()
                self.heal_state_, self.heal_log_ = heal(self, model, tokenizer, data)
                timings["heal"] = time.perf_counter() - t0
        self.tokens_ = acts.tokens
        self.calibration_ = data.name
        timings["total"] = time.perf_counter() - started
        self.timings_ = timings
        self.model_type_ = getattr(model.config, "model_type", None)
        return self

    def _check_shapes(self, model: nn.Module) -> None:
        for ffn in self.ffns_:
            if self.router == "gate" and ffn.gate is None:
                raise ConfigError(
                    f"--router gate needs GLU FFNs (gate_proj/up_proj/down_proj, e.g. Llama's SwiGLU); {ffn.name} has "
                    "no gate projection: use --router mlp (or centroid)"
                )
            d_ff = ffn.modules(model)[0].out_features
            n_shared = round(self.shared * d_ff)
            routed = d_ff - n_shared
            if self.experts > routed:
                raise ConfigError(
                    f"The 'experts' parameter of MoEfier must be an int in [1, {routed}] for {ffn.name} "
                    f"({d_ff} neurons, {n_shared} shared). Got {self.experts} instead."
                )

    def statistics(self) -> list[Any]:
        """The statistics `fit` collects (see `posthoc.analyse.activations`)."""
        stats = [Moments(), InputSample(self.router_tokens, seed=self.seed)]
        if self.shared > 0:
            stats.append(ActiveCounts(top_fraction=self.coactivation_fraction, score=self.score))
        if self.partition == "coactivation":
            stats.append(CoActivation(top_fraction=self.coactivation_fraction, score=self.score))
        return stats

    def _collect(self, model: nn.Module, tokenizer: Any, data: CalibrationData):
        acts = collect(model, data, self.statistics(), tokenizer=tokenizer, ffns=self.ffns_,
                       max_tokens=self.max_tokens, max_length=self.max_length, batch_size=self.batch_size,
                       progress=self.progress, threads=self.threads)
        return self._check_activations(acts, data.name)

    def _check_activations(self, acts: Any, name: str = "calibration") -> Any:
        have = set(acts.statistics[0]) if acts.statistics else set()
        missing = sorted({s.name for s in self.statistics()} - have)
        if missing:
            raise ConfigError(f"the activations given to MoEfier.fit lack {missing}; collect self.statistics()")
        if [f.index for f in acts.ffns] != [f.index for f in self.ffns_]:
            raise ConfigError("the activations given to MoEfier.fit do not cover every FFN of the model")
        needed = max(64, 8 * self.experts)
        if acts.tokens < needed:
            raise DataError(
                f"calibration data {name!r} gave {acts.tokens} tokens; MoE-fication into {self.experts} experts "
                f"needs at least {needed} (router training holds 10 % out): give more text or raise --max-tokens"
            )
        return acts

    def _fit_layers(self, model: nn.Module, acts) -> None:
        n_layers = len(self.ffns_)
        self.top_k_, self.thresholds_ = [self.top_k] * n_layers, [None] * n_layers
        self.compensation_, self.heal_state_ = None, [{} for _ in self.ffns_]
        self.layer_heal_seconds_ = self.layer_heal_cpu_seconds_ = None
        self.orders_, self.sizes_, self.shared_, self.routers_ = [], [], [], []
        self.recall_, self.router_curves_, self.layer_errors_ = [], [], None
        samples: list[torch.Tensor] = []
        for ffn in self.ffns_:
            w = ffn_weights(model, ffn)
            d_ff = w.d_ff
            n_shared = round(self.shared * d_ff)
            if n_shared:
                frequency = acts.result(ffn.index, "active")["active"]
                shared_idx = frequency.argsort(descending=True, stable=True)[:n_shared].sort().values
            else:
                shared_idx = torch.empty(0, dtype=torch.long)
            routed = torch.ones(d_ff, dtype=torch.bool)
            routed[shared_idx] = False
            routed_idx = routed.nonzero().flatten()
            sizes = expert_sizes(len(routed_idx), self.experts)
            counts = None
            if self.partition == "coactivation":
                counts = acts.result(ffn.index, "coactivation")["counts"][routed_idx][:, routed_idx]
            with torch_threads(1):  # many small ops: a second thread only waits (30x slower on a busy machine)
                labels = partition_neurons(
                    self.partition, sizes, rows=self._rows(w)[routed_idx], coactivation=counts, seed=self.seed + ffn.index
                )
            order = torch.cat([shared_idx, routed_idx[order_from_labels(labels, sizes)]])
            self.orders_.append(order)
            self.sizes_.append(sizes)
            self.shared_.append(n_shared)
            x = acts.result(ffn.index, "inputs")["x"].float()
            samples.append(x)
            if ffn.index == self.ffns_[0].index:
                self.speed_inputs_ = x[:2048].clone()  # real FFN inputs for speed measurements (not saved)
            pw = w.permuted(order)
            routers, recall, curve = self._fit_routers(pw, sizes, n_shared, x, ffn.index)
            self.routers_.append(routers)
            self.recall_.append(recall)
            self.router_curves_.append(curve)
        self._fit_budgets(model, samples)
        if (self.lora_rank or self.layer_heal_epochs) and self.router != "oracle":
            t0, cpu = time.perf_counter(), time.process_time()
            self.heal_state_ = heal_layers(self, model, samples)
            self.layer_heal_seconds_ = time.perf_counter() - t0
            self.layer_heal_cpu_seconds_ = time.process_time() - cpu

    def _rows(self, w: FFNWeights) -> torch.Tensor:
        """Rows of the first matrix that describe when a neuron fires (k-means space, centroid router).

        GLU (SwiGLU) FFNs: h = silu(g·x)·(u·x). The gate decides *whether* a neuron is on (silu is ~0 for
        negative g·x, like ReLU's first matrix in MoEfication), and the sign of g·x matters, while the up
        row only scales the output and its sign is irrelevant to |h|. So k-means runs on the normalised
        gate rows by default; 'up' and 'both' (the two normalised rows side by side) are options.
        """
        if w.gate is None or self.kmeans_rows == "up":
            return w.up
        if self.kmeans_rows == "gate":
            return w.gate
        return torch.cat([nn.functional.normalize(w.gate, dim=1), nn.functional.normalize(w.up, dim=1)], 1)

    def _centroids(self, pw: FFNWeights, sizes: list[int], n_shared: int) -> torch.Tensor:
        rows = nn.functional.normalize(self._rows(pw).float(), dim=1)
        if rows.shape[1] != pw.d_model:  # 'both': centroid of the gate half (the router reads x in d dims)
            rows = rows[:, : pw.d_model]
        centres = torch.stack([rows[n_shared + s - z : n_shared + s].mean(0) for s, z in zip(_ends(sizes), sizes)])
        return nn.functional.normalize(centres, dim=1)

    def _fit_routers(
        self, pw: FFNWeights, sizes: list[int], n_shared: int, x: torch.Tensor, index: int
    ) -> tuple[dict[str, nn.Module], dict[str, float], list[float]]:
        """Centroid router (from weights) and MLP router (trained on the sample); recall on held-out tokens."""
        d, e = pw.d_model, len(sizes)
        centroid = CentroidRouter(d, e)
        with torch.no_grad():
            centroid.weight.copy_(self._centroids(pw, sizes, n_shared))
        routers: dict[str, nn.Module] = {"centroid": centroid}
        inputs = {"centroid": x}  # what each router reads: x, or the activated gates of the routed neurons
        if pw.gate is not None:
            routers["gate"] = self._gate_router(pw, sizes, n_shared, x)
            inputs["gate"] = torch.cat([gate_activations(pw, x[j : j + 4096])[:, n_shared:]
                                        for j in range(0, x.shape[0], 4096)])
        mass = expert_mass(pw, sizes, n_shared, x, self.score)  # (n, E)
        n = x.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + index))
        n_val = max(8, n // 10)
        val, train = perm[:n_val], perm[n_val:]
        curve: list[float] = []
        if self.router == "mlp":
            mlp = MLPRouter(d, e, self.router_hidden)
            with torch.no_grad():
                if mlp.first.weight.shape[0] == e:
                    mlp.first.weight.copy_(centroid.weight)
                    mlp.first.bias.zero_()
                    mlp.second.weight.copy_(torch.eye(e))
                    mlp.second.bias.zero_()
            curve = train_router(mlp, x[train], mass[train], x[val], mass[val], epochs=self.router_epochs,
                                 seed=self.seed + index)
            routers["mlp"] = mlp
        k = min(self.top_k, e)
        recall = {name: router_recall(r(inputs.get(name, x)[val]).detach(), mass[val], k) for name, r in routers.items()}
        return routers, recall, curve

    def _gate_router(self, pw: FFNWeights, sizes: list[int], n_shared: int, x: torch.Tensor) -> GateRouter:
        """The gate router's neuron weights: ‖W_down[:, i]‖ ('output' score; 1 with 'magnitude'), times the
        RMS of u_i·x over the calibration sample with `gate_up_scale`."""
        router = GateRouter(sizes)
        weight = pw.down_norms() if self.score == "output" else torch.ones(pw.d_ff)
        if self.gate_up_scale:
            square = torch.zeros(pw.d_ff)
            for j in range(0, x.shape[0], 4096):
                square += nn.functional.linear(x[j : j + 4096], pw.up.float(), pw.up_bias).square().sum(0)
            weight = weight * (square / x.shape[0]).sqrt()
        with torch.no_grad():
            router.weight.copy_(weight[n_shared:])
        return router.eval()

    def _fit_budgets(self, model: nn.Module, samples: list[torch.Tensor]) -> None:
        """Per-layer k (uniform or greedy), thresholds for threshold routing, compensation vectors."""
        n_layers = len(self.ffns_)
        layers = [self.build_layer(model, i, permuted=False) for i in range(n_layers)]
        if self.layer_budget == "greedy":
            errors = [output_errors(layer, x[:2048]) for layer, x in zip(layers, samples)]  # (E,) each
            self.top_k_ = greedy_budget(errors, self.top_k * n_layers, k_min=1)
            self.layer_errors_ = [e.tolist() for e in errors]
        if self.routing == "threshold":
            for i, (layer, x) in enumerate(zip(layers, samples)):
                with torch.no_grad():
                    self.thresholds_[i] = calibrate_threshold(unit_scores(layer, layer.router_scores(x)), self.top_k_[i])
        if self.compensation:
            self.compensation_ = []
            for i, (layer, x) in enumerate(zip(layers, samples)):
                layer.set_routing(top_k=self.top_k_[i], routing=self.routing, threshold=self.thresholds_[i])
                self.compensation_.append(skipped_means(layer, x))

    # ------------------------------------------------------------------------------------------ runtime

    def build_layer(
        self, model: nn.Module, i: int, *, permuted: bool, router: str | None = None, top_k: int | None = None,
        healed: bool = True,
    ) -> MoEFFN:
        """The MoE layer of FFN i; `permuted` says whether the model's weights are already in expert order;
        `healed=False` leaves out what healing trained (the LoRA term, scales, trained matrices)."""
        ffn = self.ffns_[i]
        w = ffn_weights(model, ffn)
        if not permuted:
            w = w.permuted(self.orders_[i])
        kind = router or self.router
        if kind != "oracle" and kind not in self.routers_[i]:
            raise ConfigError(f"router {kind!r} was not trained; available: {', '.join([*self.routers_[i], 'oracle'])}")
        module = None if kind == "oracle" else copy.deepcopy(self.routers_[i][kind])
        k = top_k if top_k is not None else self.top_k_[i]
        if not 1 <= k <= len(self.sizes_[i]):
            raise ConfigError(
                f"The 'top_k' parameter must be an int in [1, experts={len(self.sizes_[i])}]. Got {k} instead."
            )
        threshold = self.thresholds_[i]
        routing = self.routing if (threshold is not None and top_k is None) else "topk"
        layer = MoEFFN(w, self.sizes_[i], self.shared_[i], module, top_k=k, routing=routing, threshold=threshold,
                       score=self.score, lora_rank=self.lora_rank)
        layer.masked = layer.gated and self.kernel == "masked"
        if self.compensation_ is not None:
            layer.compensation.copy_(self.compensation_[i])
            layer.use_compensation = True
        state = dict(self.heal_state_[i]) if healed else {}
        healed_threshold = state.pop(HEALED_THRESHOLD, None)
        if state:
            layer.load_state_dict(state, strict=False)
        if healed_threshold is not None and layer.routing == "threshold":
            layer.threshold = float(healed_threshold)
        return layer.eval()

    def apply(
        self, model: nn.Module, *, permuted: bool = False, router: str | None = None, top_k: int | None = None,
        healed: bool = True,
    ) -> nn.Module:
        """Install MoE layers into `model` (in place) and return it. `permuted=True` for a model loaded
        from this analyser's output (weights already in expert order); `healed=False`: without what healing
        trained. Healing fits the layers to the k they were healed at: at another k a healed model is worse
        (measured on MiniLM: healed at top-4, 0.95 cosine at 4 of 16 experts, 0.69 with all 16), so that
        case warns."""
        self._resolve_ffns(model)
        if healed and top_k is not None and self.is_healed() and any(top_k != k for k in self.top_k_):
            log.warning(
                "this MoE output was healed at top_k %s, not %s: healing fits the layers to their own k, so the model "
                "is worse at another one (with every expert it is not the dense model); load with healed=False for "
                "the unhealed layers, or heal at the k you will run", sorted(set(self.top_k_)), top_k)
        for i, ffn in enumerate(self.ffns_):
            install_moe(model, ffn, self.build_layer(model, i, permuted=permuted, router=router, top_k=top_k,
                                                     healed=healed))
        return model

    def is_healed(self) -> bool:
        """Whether healing (layer-wise or whole-model) trained anything that the layers load (False unfitted)."""
        return any(any(k != HEALED_THRESHOLD for k in state) for state in getattr(self, "heal_state_", []))

    def _resolve_ffns(self, model: nn.Module) -> None:
        """After `load`, find the FFNs in the model and check they are the ones the output describes."""
        if self.ffns_ is not None:
            return
        ffns = find_ffns(model, self.ffn_modules)
        saved = [(s["up"], s["down"], s.get("gate")) for s in self.ffn_specs_]
        if [(f.up, f.down, f.gate) for f in ffns] != saved:
            raise MoEError(
                f"the model's FFNs ({len(ffns)}, first {ffns[0].up}) are not the ones the MoE output describes "
                f"({len(saved)}, first {saved[0][0]}): was the checkpoint replaced?"
            )
        self.ffns_ = ffns

    # ------------------------------------------------------------------------------------------ save / load

    def save(self, out_dir: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
             force: bool = False, report: Any = None, extra: dict[str, Any] | None = None) -> Path:
        """Write OUT_DIR: the base checkpoint with FFN neurons in expert order (transformers loads it as
        the same dense model), `experts.safetensors` + `experts.json` (partition, routers, budgets),
        `module.json` (a posthoc module of kind "experts") and the report, atomically."""
        base = base or self.source_
        if base is None:
            raise ConfigError("MoEfier.save: the model was given in memory; pass base= the checkpoint it was loaded from")
        return write_output(self, Path(base), Path(out_dir), force=force, report=report, extra=extra or {})

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> MoEfier:
        """The fitted MoEfier of an output directory (`save`), ready for `apply`."""
        return read_output(cls, Path(directory))


# ------------------------------------------------------------------------------------------ kernels


def _ends(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        total += s
        out.append(total)
    return out


def gate_activations(pw: FFNWeights, x: torch.Tensor) -> torch.Tensor:
    """act(W_gate x + b) of every neuron (n, d_ff): what the gate router reads (GLU FFNs)."""
    return pw.act(nn.functional.linear(x, pw.gate.float(), pw.gate_bias))


def expert_mass(pw: FFNWeights, sizes: list[int], n_shared: int, x: torch.Tensor, score: str) -> torch.Tensor:
    """(n, E) activation mass of every routed expert on every sampled token (weights in expert order)."""
    out = []
    norms = pw.down_norms()
    for start in range(0, x.shape[0], 4096):
        s = neuron_scores(pw.hidden(x[start : start + 4096]), norms, score)[:, n_shared:]
        index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        out.append(torch.zeros(s.shape[0], len(sizes)).index_add_(1, index, s))
    return torch.cat(out)


def train_router(
    router: MLPRouter, x: torch.Tensor, mass: torch.Tensor, x_val: torch.Tensor, mass_val: torch.Tensor,
    *, epochs: int = 30, batch_size: int = 512, lr: float = 0.01, seed: int = 0, patience: int = 5,
) -> list[float]:
    """MoEfication's recipe: BCE between the router's logits and each expert's mass normalised by the
    token's largest, Adam lr 0.01, batch 512; the epoch with the lowest held-out loss is kept."""
    target = mass / mass.max(dim=1, keepdim=True).values.clamp(min=1e-12)
    target_val = mass_val / mass_val.max(dim=1, keepdim=True).values.clamp(min=1e-12)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(seed)
    best, best_state, curve, bad = math.inf, copy.deepcopy(router.state_dict()), [], 0
    with torch_threads(1):  # (512, d) @ (d, E) steps: one thread is 30x faster than two on a busy machine
        for _ in range(epochs):
            router.train()
            for idx in torch.randperm(x.shape[0], generator=generator).split(batch_size):
                loss = loss_fn(router(x[idx]), target[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            router.eval()
            with torch.no_grad():
                val = float(loss_fn(router(x_val), target_val))
            curve.append(val)
            if val < best - 1e-6:
                best, best_state, bad = val, copy.deepcopy(router.state_dict()), 0
            else:
                bad += 1
                if bad >= patience:
                    break
    router.load_state_dict(best_state)
    return curve


def router_recall(scores: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Mean over tokens of (mass of the router's top-k) / (mass of the oracle's top-k)."""
    chosen = mass.gather(1, scores.topk(k, dim=1).indices).sum(1)
    best = mass.topk(k, dim=1).values.sum(1).clamp(min=1e-12)
    return float((chosen / best).mean())


@torch.no_grad()
def output_errors(layer: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """(E,) squared error of the FFN output with the router's top-k experts, k = 1..E (k = E: 0), relative
    to the dense output's (‖y_k − y‖² / ‖y‖², means over tokens): layers whose outputs differ in scale
    (the last layers' are larger) are compared on what they lose, not on their scale."""
    h = layer.hidden_all(x)
    dense = h @ layer.down_t  # (n, d)
    ranked = layer.router_scores(x).argsort(dim=1, descending=True)  # (n, E)
    shared = h[:, : layer.shared] @ layer.down_t[: layer.shared]
    partial = torch.stack([h[:, lo:hi] @ layer.down_t[lo:hi] for lo, hi in zip(layer.offsets[:-1], layer.offsets[1:])], 1)
    ordered = partial.gather(1, ranked[:, :, None].expand_as(partial))  # (n, E, d) in router order
    approx = shared[:, None] + ordered.cumsum(1)  # (n, E, d): top-1, top-2, … outputs
    dense_b = dense if layer.down_bias is None else dense + layer.down_bias  # the output the next block sees
    energy = dense_b.square().sum(-1).mean().clamp(min=1e-12)
    return (approx - dense[:, None]).square().sum(-1).mean(0) / energy


def greedy_budget(errors: list[torch.Tensor], total: int, k_min: int = 1) -> list[int]:
    """Per-layer k with Σ k = total: start at k_min everywhere, then give one expert at a time to the
    layer whose error drops most (TEAL-style greedy allocation)."""
    ks = [k_min] * len(errors)
    if total < k_min * len(errors):
        raise ConfigError(f"a total of {total} experts cannot give each of {len(errors)} layers {k_min}")
    for _ in range(total - sum(ks)):
        gains = [
            float(err[k - 1] - err[k]) if k < len(err) else -math.inf for err, k in zip(errors, ks)
        ]
        best = max(range(len(ks)), key=lambda i: gains[i])
        ks[best] += 1
    return ks


@torch.no_grad()
def skipped_means(layer: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """(E, d): each expert's mean output over the sampled tokens on which the router skips it (FLAP's
    bias compensation, conditioned on being skipped: at run time Σ_{e∉S(x)} c_e is added)."""
    tokens, experts = layer.select(layer.router_scores(x))
    skipped = torch.ones(x.shape[0], layer.experts)
    skipped[tokens, experts] = 0
    h = layer.hidden_all(x)[:, layer.shared :]  # (n, routed neurons)
    index = torch.repeat_interleave(torch.arange(layer.experts), torch.tensor(layer.sizes))
    means = (skipped[:, index] * h).sum(0) / skipped.sum(0)[index].clamp(min=1)  # per neuron, over skipping tokens
    return torch.zeros(layer.experts, layer.d_model).index_add_(0, index, means[:, None] * layer.down_t[layer.shared :])
