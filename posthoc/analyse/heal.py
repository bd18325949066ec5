"""Healing: a short distillation of an MoE-fied model towards its own dense version, on calibration text.

Only the small parts train: every layer's router, its expert scales α (w_e = 1 + α_e·σ(r_e(x)), α = 0 at
the start, so healing starts from the unhealed model and the router gets a gradient through the scales)
and, when `lora_rank` > 0, a low-rank term parallel to the FFN (B initialised to 0) that learns what the
skipped experts would have added. The transformer's weights stay frozen and unchanged.

The teacher is the same model with every MoE layer in dense mode (all neurons), computed on the fly, so
nothing is cached. Losses: decoders, KL(teacher ‖ student) of next-token distributions; encoders,
(1 − cosine) of every real token's last hidden state plus (1 − cosine) of the mean-pooled embeddings.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from torch import nn

from posthoc.analyse.calibration import CalibrationData, is_causal_lm, token_batches
from posthoc.analyse.moe_layers import MoEFFN, moe_layers
from posthoc.errors import DataError
from posthoc.finetune import mean_pool, torch_threads
from posthoc.progress import progress_bar


def distillation_loss(model: nn.Module, inputs: dict[str, torch.Tensor], causal: bool) -> torch.Tensor:
    """Student (MoE) vs teacher (the same layers in dense mode) on one batch."""
    layers = moe_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.dense = True
        try:
            teacher = model(**inputs)
        finally:
            for layer in layers:
                layer.dense = False
    student = model(**inputs)
    mask = inputs["attention_mask"].bool()
    if causal:
        t = teacher.logits[mask].float().log_softmax(-1)
        s = student.logits[mask].float().log_softmax(-1)
        return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    th, sh = teacher.last_hidden_state, student.last_hidden_state
    token = 1 - nn.functional.cosine_similarity(sh[mask], th[mask], dim=-1).mean()
    pooled = 1 - nn.functional.cosine_similarity(
        mean_pool(sh, inputs["attention_mask"]), mean_pool(th, inputs["attention_mask"]), dim=-1
    ).mean()
    return token + pooled


def trainable_parameters(layer: MoEFFN) -> dict[str, nn.Parameter]:
    params = {"alpha": layer.alpha}
    if layer.router is not None:
        params.update({f"router.{k}": p for k, p in layer.router.named_parameters()})
    if layer.lora_a is not None:
        params.update({"lora_a": layer.lora_a, "lora_b": layer.lora_b})
    return params


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


def heal_layers(moe: Any, model: nn.Module, samples: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Layer by layer, on the cached calibration inputs of each FFN (no backpropagation through the model):
    fit the LoRA term by reduced-rank regression of what the MoE layer misses (dense − MoE output), then
    train router, expert scales and LoRA for `layer_heal_epochs` epochs on the output MSE."""
    states = []
    generator = torch.Generator().manual_seed(moe.seed)
    for i, x in enumerate(samples):
        layer = moe.build_layer(model, i, permuted=False)
        target = dense_outputs(layer, x)
        if layer.lora_a is not None:
            with torch.no_grad():
                layer.lora_b.zero_()
                missed = target - torch.cat([layer(x[j : j + 4096]) for j in range(0, x.shape[0], 4096)])
                a, b = reduced_rank_regression(x, missed, layer.lora_a.shape[0])
                layer.lora_a.copy_(a)
                layer.lora_b.copy_(b)
        params = trainable_parameters(layer)

        def sample_loss(layer: MoEFFN = layer, x: torch.Tensor = x, target: torch.Tensor = target) -> float:
            with torch.no_grad():
                return sum(float((layer(x[j : j + 4096]) - target[j : j + 4096]).square().sum())
                           for j in range(0, x.shape[0], 4096)) / x.shape[0]

        if moe.layer_heal_epochs:
            for p in params.values():
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(params.values(), lr=moe.heal_lr)
            best, best_state = sample_loss(), {k: p.detach().clone() for k, p in params.items()}
            with torch_threads(1):  # small per-expert matmuls: a second thread mostly waits on a busy machine
                for _ in range(moe.layer_heal_epochs):
                    for idx in torch.randperm(x.shape[0], generator=generator).split(512):
                        loss = (layer(x[idx]) - target[idx]).square().sum(-1).mean()
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                    current = sample_loss()
                    if current < best:  # keep the best epoch (the start included): training never makes it worse
                        best, best_state = current, {k: p.detach().clone() for k, p in params.items()}
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(best_state[k])
        states.append({k: p.detach().clone() for k, p in params.items()})
    return states


def heal(moe: Any, model: nn.Module, tokenizer: Any, data: CalibrationData) -> dict[str, Any]:
    """Distil the MoE layers of `moe` (an MoEfier with partitions and routers) on `data`. The trained
    parameters (router.*, alpha, lora_a/b) go to moe.heal_state_ and are loaded over moe.routers_ when
    layers are built (so the unhealed model stays available). `model` is the dense model in its
    original neuron order; it is left unchanged."""
    from posthoc.analyse.moe_layers import install_moe, restore

    if moe.router == "oracle":
        return {"steps": 0, "note": "the oracle router has nothing to heal"}
    causal = is_causal_lm(model)
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    originals = []
    started = time.perf_counter()
    losses: list[float] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for i, ffn in enumerate(moe.ffns_):
            originals.append(install_moe(model, ffn, moe.build_layer(model, i, permuted=False)))
        layers = moe_layers(model)
        params = [p for layer in layers for p in trainable_parameters(layer).values()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=moe.heal_lr)
        batches = list(token_batches(tokenizer, data, max_length=moe.max_length, batch_size=moe.heal_batch_size,
                                     pack=causal, max_tokens=moe.max_tokens))
        if not batches:
            raise DataError("healing: the calibration data gave no token batches")
        model.eval()  # no dropout: the student must match the deterministic teacher
        with progress_bar(moe.heal_steps, "heal", "step", enabled=moe.progress) as bar:
            for inputs in itertools.islice(itertools.cycle(b.inputs for b in batches), moe.heal_steps):
                loss = distillation_loss(model, inputs, causal)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update(1)
        for i, layer in enumerate(layers):
            # kept apart from moe.routers_ (the unhealed routers), loaded on top of them by build_layer
            moe.heal_state_[i] = {k: p.detach().clone() for k, p in trainable_parameters(layer).items()}
    finally:
        for saved in reversed(originals):
            restore(model, saved)
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
    return {
        "steps": len(losses),
        "seconds": round(time.perf_counter() - started, 1),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": [round(v, 5) for v in losses],
    }
