"""Healing: a short distillation of an MoE-fied model towards its own dense version, on calibration text.

What trains (copies held by the MoE layers; the model's own weights stay frozen): every layer's router,
its expert scales α (w_e = 1 + α_e·σ(r_e(x)), α = 0 at the start, so healing starts from the unhealed
model and the router gets a gradient through the scales), the compensation vectors when `compensation`
is on, the FFN biases when `heal_biases` is on, when `lora_rank` > 0 a low-rank term parallel to the FFN
that learns what the skipped experts would have added, and, when `heal_ffn_lr` > 0, the experts' own
matrices (at that smaller rate). With `layer_heal_ffn_lr` > 0 the layer-wise phase (`heal_layers`, cheap:
cached FFN inputs, no backpropagation through the model) trains the experts' matrices too, so that the
whole-model distillation starts from FFNs already fitted to their dense outputs. The checkpoint is
unchanged: what trains is stored as the healing state, loaded over the MoE layers only.

The teacher is the original dense model (the MoE layers swapped out for the step). Encoders' teacher
outputs are computed once per calibration batch and kept (float16) when they fit in `TEACHER_CACHE_BYTES`.
Losses: decoders, KL(teacher ‖ student) of next-token distributions; encoders, (1 − cosine) of every real
token's last hidden state plus (1 − cosine) of the mean-pooled embeddings (what the targets measure);
both plus `heal_hidden` × the mean over layers of the relative squared error of every layer's hidden
states (‖s − t‖² / ‖t‖² over real tokens), which gives every layer a direct signal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from posthoc.analyse.base import frozen
from posthoc.analyse.calibration import CalibrationData, is_causal_lm, token_batches
from posthoc.analyse.moe.layers import (
    HEALED_THRESHOLD,
    MoEFFN,
    calibrate_threshold,
    install_moe,
    moe_layers,
    restore,
    unit_scores,
)
from posthoc.errors import DataError
from posthoc.models import mean_pool
from posthoc.progress import progress_bar
from posthoc.threads import torch_threads

TEACHER_CACHE_BYTES = 2 << 30


def teacher_outputs(model: nn.Module, inputs: dict[str, torch.Tensor], causal: bool, hidden: bool = False
                    ) -> dict[str, Any]:
    """The model's outputs without gradients: {"logits" (decoders) or "last" (encoders), "hidden": the
    hidden states after every layer or None}. Called on the dense model (or MoE layers in dense mode)."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=hidden)
    result: dict[str, Any] = {"hidden": tuple(out.hidden_states[1:]) if hidden else None}
    if causal:
        result["logits"] = out.logits
    else:
        result["last"] = out.last_hidden_state
    return result


def relative_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖s − t‖² / ‖t‖² summed over the real tokens of (batch, tokens, d) hidden states."""
    s, t = student[mask].float(), teacher[mask].float()
    return (s - t).square().sum() / t.square().sum().clamp(min=1e-12)


def distillation_loss(model: nn.Module, inputs: dict[str, torch.Tensor], causal: bool, *,
                      teacher: dict[str, Any] | None = None, hidden_weight: float = 0.0) -> torch.Tensor:
    """Student (the model with its MoE layers) vs teacher on one batch. teacher: `teacher_outputs` of the
    dense model; None: computed here with every MoE layer in dense mode."""
    hidden = hidden_weight > 0
    if teacher is None:
        layers = moe_layers(model)
        for layer in layers:
            layer.dense = True
        try:
            teacher = teacher_outputs(model, inputs, causal, hidden)
        finally:
            for layer in layers:
                layer.dense = False
    student = model(**inputs, output_hidden_states=hidden)
    mask = inputs["attention_mask"].bool()
    if causal:
        t = teacher["logits"][mask].float().log_softmax(-1)
        s = student.logits[mask].float().log_softmax(-1)
        loss = nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    else:
        th, sh = teacher["last"].float(), student.last_hidden_state
        token = 1 - nn.functional.cosine_similarity(sh[mask], th[mask], dim=-1).mean()
        pooled = 1 - nn.functional.cosine_similarity(
            mean_pool(sh, inputs["attention_mask"]), mean_pool(th, inputs["attention_mask"]), dim=-1
        ).mean()
        loss = token + pooled
    if hidden:
        errors = [relative_error(s, t, mask) for s, t in zip(student.hidden_states[1:], teacher["hidden"])]
        loss = loss + hidden_weight * torch.stack(errors).mean()
    return loss


def trainable_parameters(layer: MoEFFN, biases: bool = False, weights: bool = False) -> dict[str, torch.Tensor]:
    """What healing trains in one MoE layer (names as in the layer's state dict, so the healing state
    loads with `load_state_dict(strict=False)`): router, expert scales, compensation vectors (when on),
    LoRA (when present), with `biases` the FFN's first-matrix and output biases (when it has them), with
    `weights` the experts' own matrices (first and down)."""
    params: dict[str, torch.Tensor] = {"alpha": layer.alpha}
    if layer.router is not None:
        params.update({f"router.{k}": p for k, p in layer.router.named_parameters()})
    if layer.use_compensation:
        params["compensation"] = layer.compensation
    if layer.lora_a is not None:
        params.update({"lora_a": layer.lora_a, "lora_b": layer.lora_b})
    if biases:
        params.update({k: p for k, p in (("first_bias", layer.first_bias), ("down_bias", layer.down_bias))
                       if p is not None})
    if weights:
        params.update({"first_weight": layer.first_weight, "down_t": layer.down_t})
    return params


def optimizer_for(layers: list[MoEFFN], moe: Any, weights: bool = True) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """Adam over every layer's trainable parameters: the experts' matrices (when `weights` and
    `heal_ffn_lr` > 0) at `heal_ffn_lr`, the rest at `heal_lr`."""
    small, big = [], []
    for layer in layers:
        for name, p in trainable_parameters(layer, moe.heal_biases, weights and moe.heal_ffn_lr > 0).items():
            (big if name in ("first_weight", "down_t") else small).append(p)
    groups = [{"params": small, "lr": moe.heal_lr}] + ([{"params": big, "lr": moe.heal_ffn_lr}] if big else [])
    for p in small + big:
        p.requires_grad_(True)
    return torch.optim.Adam(groups), small + big


@torch.no_grad()
def reduced_rank_regression(x: torch.Tensor, residual: torch.Tensor, rank: int, ridge: float = 1e-3
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) minimising ‖residual − x Aᵀ Bᵀ‖² over rank-r maps: the ridge solution W,
    projected on the top-r directions of its fitted values x W (reduced-rank regression)."""
    x, residual = x.double(), residual.double()
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, x.T @ residual)  # (d_in, d_out)
    fitted = x @ w
    _, vectors = torch.linalg.eigh(fitted.T @ fitted)  # ascending
    v = vectors[:, -rank:]  # (d_out, r)
    return (w @ v).T.float().contiguous(), v.float().contiguous()


def dense_outputs(layer: MoEFFN, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    with torch.no_grad():
        was, layer.dense = layer.dense, True
        try:
            return torch.cat([layer(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])
        finally:
            layer.dense = was


class ThresholdBudget:
    """Keeps threshold routing at its average budget while a router trains.

    The selection is not differentiable, but the expert scales give the router a gradient that rewards
    spreading its scores, and every expert that then clears the fixed threshold lowers the loss: measured
    on MiniLM (16 experts, average 4, 200 healing steps) the neurons computed per token rose from 25 % to
    91 %. So, while it is attached, each routing call first recalibrates the layer's threshold on the
    call's own scores (average k = the layer's top_k), and `threshold()` gives the mean of the recent
    calibrations (what the healed layer keeps)."""

    def __init__(self, layer: MoEFFN, keep: int = 50):
        self.layer, self.keep, self.values = layer, keep, []
        self._handle = layer.router.register_forward_hook(self._hook) if layer.router is not None else None

    def _hook(self, module: nn.Module, inputs: Any, scores: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training calls only
            with torch.no_grad():
                self.layer.threshold = calibrate_threshold(unit_scores(self.layer, scores.detach()), self.layer.top_k)
            self.values = (self.values + [self.layer.threshold])[-self.keep:]

    def threshold(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else self.layer.threshold

    def detach(self) -> float | None:
        if self._handle is not None:
            self._handle.remove()
        return self.threshold()


def threshold_budgets(layers: list[MoEFFN]) -> list[ThresholdBudget | None]:
    return [ThresholdBudget(layer) if layer.routing == "threshold" and layer.router is not None else None
            for layer in layers]


def fit_lora(layer: MoEFFN, x: torch.Tensor, target: torch.Tensor) -> None:
    """Set the layer's LoRA term to the reduced-rank regression of what it misses (dense − MoE output) on x."""
    with torch.no_grad():
        layer.lora_b.zero_()
        missed = target - torch.cat([layer(x[j : j + 4096]) for j in range(0, x.shape[0], 4096)])
        a, b = reduced_rank_regression(x, missed, layer.lora_a.shape[0])
        layer.lora_a.copy_(a)
        layer.lora_b.copy_(b)


def train_layer(moe: Any, layer: MoEFFN, params: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor,
                generator: torch.Generator) -> None:
    """`layer_heal_epochs` epochs of output MSE on (x, target) in batches of 512; `params` end at the best epoch
    (the start included: training never makes the layer worse on its sample) and frozen again."""

    def sample_loss() -> float:
        with torch.no_grad():
            return sum(float((layer(x[j : j + 4096]) - target[j : j + 4096]).square().sum())
                       for j in range(0, x.shape[0], 4096)) / x.shape[0]

    optimizer, _ = optimizer_for([layer], moe, weights=False)
    if moe.layer_heal_ffn_lr > 0:
        optimizer.add_param_group({"params": [layer.first_weight, layer.down_t], "lr": moe.layer_heal_ffn_lr})
        layer.first_weight.requires_grad_(True)
        layer.down_t.requires_grad_(True)
    best, best_state = sample_loss(), {k: p.detach().clone() for k, p in params.items()}
    with torch_threads(1):  # small per-expert matmuls: a second thread mostly waits on a busy machine
        for _ in range(moe.layer_heal_epochs):
            for idx in torch.randperm(x.shape[0], generator=generator).split(512):
                loss = (layer(x[idx]) - target[idx]).square().sum(-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            current = sample_loss()
            if current < best:
                best, best_state = current, {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(best_state[k])
    for p in params.values():
        p.requires_grad_(False)


def heal_layers(moe: Any, model: nn.Module, samples: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Layer by layer, on the cached calibration inputs of each FFN (no backpropagation through the model):
    fit the LoRA term by reduced-rank regression of what the MoE layer misses (dense − MoE output), then
    train router, expert scales, compensation, LoRA (and biases with `heal_biases`) for `layer_heal_epochs`
    epochs on the output MSE; with `layer_heal_ffn_lr` > 0 the experts' matrices too, at that rate (the
    largest single gain measured on MiniLM at 25 %: see benchmarks/RESULTS.md). Returns what trained, per
    FFN (MoEfier.fit keeps it as heal_state_); `moe` is only read."""
    states = []
    generator = torch.Generator().manual_seed(moe.seed)
    for i, x in enumerate(samples):
        layer = moe.build_layer(model, i, permuted=False)
        target = dense_outputs(layer, x)
        if layer.lora_a is not None:
            fit_lora(layer, x, target)
        params = trainable_parameters(layer, moe.heal_biases, moe.layer_heal_ffn_lr > 0)
        budget = threshold_budgets([layer])[0]
        if moe.layer_heal_epochs:
            train_layer(moe, layer, params, x, target, generator)
        if budget is not None:
            budget.detach()
            with torch.no_grad():  # the trained router's threshold for an average of top_k on the whole sample
                layer.threshold = calibrate_threshold(unit_scores(layer, layer.router_scores(x)), layer.top_k)
        state = {k: p.detach().clone() for k, p in params.items()}
        if budget is not None:  # the healed router's own threshold, kept with what healing trained
            state[HEALED_THRESHOLD] = torch.tensor(layer.threshold, dtype=torch.float32)
        states.append(state)
    return states


class DenseTeacher:
    """The original dense model's outputs on a calibration batch, for the student (the model with MoE layers).

    The MoE layers are swapped out for each call: trainable biases and compensation live in the MoE layers,
    so their dense mode is no longer the dense model. Encoders' outputs of every batch are kept (float16)
    when the batches are seen more than once and all of them fit in TEACHER_CACHE_BYTES (decoders' logits
    never do)."""

    def __init__(self, model: nn.Module, installed: list[tuple[Any, MoEFFN, dict[str, nn.Module]]], causal: bool,
                 hidden: bool, batches: list[dict[str, torch.Tensor]], steps: int):
        self.model, self.installed, self.causal, self.hidden = model, installed, causal, hidden
        self.cache: dict[int, dict[str, Any]] | None = {} if not causal and steps > len(batches) else None
        self.positions = sum(int(b["attention_mask"].numel()) for b in batches)

    def outputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        for _, _, originals in reversed(self.installed):
            restore(self.model, originals)
        try:
            return teacher_outputs(self.model, inputs, self.causal, self.hidden)
        finally:
            for j, (ffn, layer, _) in enumerate(self.installed):
                self.installed[j] = (ffn, layer, install_moe(self.model, ffn, layer))

    def __call__(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The teacher's outputs on batch `index` (whose tensors are `inputs`), from the cache when kept."""
        if self.cache is None:
            return self.outputs(inputs)
        if index not in self.cache:
            out = self.outputs(inputs)
            kept = [out["last"], *(out["hidden"] or ())]
            if self.positions * 2 * sum(t.shape[-1] for t in kept) > TEACHER_CACHE_BYTES:
                self.cache = None
                return out
            self.cache[index] = {"last": kept[0].half(), "hidden": tuple(t.half() for t in kept[1:]) or None}
        return self.cache[index]


@contextmanager
def installed_layers(moe: Any, model: nn.Module) -> Iterator[list[tuple[Any, MoEFFN, dict[str, nn.Module]]]]:
    """`model` with the unhealed-or-layer-healed MoE layers of `moe` installed: (ffn, layer, originals) per
    FFN, the originals put back after the block."""
    installed: list[tuple[Any, MoEFFN, dict[str, nn.Module]]] = []
    try:
        for i, ffn in enumerate(moe.ffns_):
            layer = moe.build_layer(model, i, permuted=False)
            installed.append((ffn, layer, install_moe(model, ffn, layer)))
        yield installed
    finally:
        for _, _, originals in reversed(installed):
            restore(model, originals)


def distil(moe: Any, model: nn.Module, layers: list[MoEFFN], batches: list[dict[str, torch.Tensor]],
           teacher: DenseTeacher, causal: bool) -> list[float]:
    """`heal_steps` Adam steps on the distillation loss (rates cosine-decayed to a tenth); the losses."""
    optimizer, _ = optimizer_for(layers, moe)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to a tenth of every group's rate
        optimizer, lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * min(step, moe.heal_steps) / max(1, moe.heal_steps))))
    losses: list[float] = []
    with progress_bar(moe.heal_steps, "heal", "step", enabled=moe.progress) as bar:
        for step in range(moe.heal_steps):
            inputs = batches[step % len(batches)]
            loss = distillation_loss(model, inputs, causal, teacher=teacher(step % len(batches), inputs),
                                     hidden_weight=moe.heal_hidden)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
    return losses


def heal(moe: Any, model: nn.Module, tokenizer: Any, data: CalibrationData
         ) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Distil the MoE layers of `moe` (an MoEfier with partitions and routers, and the layer-wise healing
    state, if any, in heal_state_) on `data`. Returns (states, log): per FFN what trained (see
    `trainable_parameters`), which `build_layer` loads over the unhealed routers (so the unhealed model stays
    available; MoEfier.fit keeps it as heal_state_), and the losses and timings. `moe` is only read; `model`,
    the dense model in its original neuron order, is left as it was (`frozen`).

    Adam at `heal_lr`, cosine-decayed to a tenth over `heal_steps`, on batches of `heal_batch_size`
    sequences from the first `heal_tokens` calibration tokens (cycled)."""
    if moe.router == "oracle":
        return [dict(state) for state in moe.heal_state_], {"steps": 0, "note": "the oracle router has nothing to heal"}
    causal = is_causal_lm(model)
    started, cpu = time.perf_counter(), time.process_time()
    with frozen(model), installed_layers(moe, model) as installed:
        layers = [layer for _, layer, _ in installed]
        budgets = threshold_budgets(layers)  # threshold routing: the budget kept while routers train
        try:
            batches = [b.inputs for b in token_batches(tokenizer, data, max_length=moe.max_length,
                                                         batch_size=moe.heal_batch_size, pack=causal,
                                                         max_tokens=moe.heal_tokens or moe.max_tokens)]
            if not batches:
                raise DataError("healing: the calibration data gave no token batches")
            teacher = DenseTeacher(model, installed, causal, moe.heal_hidden > 0, batches, moe.heal_steps)
            losses = distil(moe, model, layers, batches, teacher, causal)
            weights = moe.heal_ffn_lr > 0 or moe.layer_heal_ffn_lr > 0
            states = []
            for layer, budget in zip(layers, budgets):
                trained = trainable_parameters(layer, moe.heal_biases, weights)
                states.append({k: p.detach().clone() for k, p in trained.items()})
                if budget is not None:  # the healed router's threshold; moe.thresholds_ stay the unhealed ones
                    states[-1][HEALED_THRESHOLD] = torch.tensor(budget.threshold(), dtype=torch.float32)
        finally:
            for budget in budgets:
                if budget is not None:
                    budget.detach()
    return states, {
        "steps": len(losses),
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),  # this process's CPU time (the machine is shared)
        "batches": len(batches),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": [round(v, 5) for v in losses],
    }
