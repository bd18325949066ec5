"""`posthoc split mask`: learn one subnetwork mask per task, compare them, write report and mask modules.

    OUT_DIR/report.html (+ PNGs)   density, masked / inverted / random-mask quality per task, IoU between
                                   tasks, per-layer density, training curves
    OUT_DIR/masks.json             the numbers
    OUT_DIR/masks/<task>/          one `mask` module per task (1 = kept weight or neuron)
    OUT_DIR/pruned/<task>/         with `pruned=True`: the model with only the kept weights (transformers loads it)

A task is (name, training data, evaluation data): labelled texts (classification, accuracy) or plain texts
(language modelling of a causal LM, mean token loss). `parse_task` reads the CLI's `DATA[:class,class]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from posthoc.analyse.masks.masker import SubnetworkMasker, mask_iou
from posthoc.data import TextClassificationData
from posthoc.report import Report


def summary(results: list[MaskResult]) -> dict[str, Any]:
    out: dict[str, Any] = {"tasks": {}, "iou": {}}
    for r in results:
        m = r.masker
        out["tasks"][r.task.name] = {
            "kind": m.task_, "metric": m.metric_, "train_examples": len(r.task.train), "test_examples": len(r.task.test),
            "density": m.density_, "layer_density": {str(k): v for k, v in m.layer_density_.items()},
            "role_density": m.role_density_, "scores": r.scores, "seconds": m.seconds_,
            "final_task_loss": m.history_[-1]["task_loss"], "params": {
                k: v for k, v in m.get_params().items() if k not in ("head", "progress", "threads")},
        }
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            if a.masker.granularity == b.masker.granularity and set(a.masker.mask_) == set(b.masker.mask_):
                out["iou"][f"{a.task.name} | {b.task.name}"] = {
                    "all": mask_iou(a.masker.mask_, b.masker.mask_),
                    "by_layer": layer_iou(a.masker, b.masker),
                }
    return out


def layer_iou(a: SubnetworkMasker, b: SubnetworkMasker) -> dict[str, float]:
    out = {}
    for layer in sorted({t.layer for t in a.targets_}):
        names = [t.tensor for t in a.targets_ if t.layer == layer]
        out[str(layer)] = mask_iou({n: a.mask_[n] for n in names}, {n: b.mask_[n] for n in names})
    return out


def mask_report(results: list[MaskResult], source: str) -> Report:
    first = results[0].masker
    report = Report(f"Subnetwork masks of {source}",
                    f"{first.granularity} masks, α = {first.alpha_:g}, {first.steps} steps, lr {first.lr}")
    report.section("Masks per task", (
        "Weights frozen; a hard Gumbel-sigmoid mask per "
        + ("weight of every linear map in the transformer blocks" if first.granularity == "weight" else "FFN neuron")
        + " is learned with loss = task loss + α · density; the final mask keeps logits > 0. "
        "Masked: only the kept entries; inverted: only the removed ones; random: a random mask of the same density "
        "per tensor. Scores on held-out texts."))
    rows = []
    for r in results:
        m, s = r.masker, r.scores
        rows.append([r.task.name, m.metric_, len(r.task.train), len(r.task.test), m.density_, s["full"], s["mask"],
                     s["inverted"], s["random"], round(m.seconds_, 1)])
    report.table(["task", "metric", "train", "test", "density", "full model", "masked", "inverted", "random mask",
                  "seconds"], rows, floatfmt=".4f")
    iou = summary(results)["iou"]
    if iou:
        report.section("Overlap between tasks", "IoU = |kept by both| / |kept by either|, over every masked entry.")
        report.table(["tasks", "IoU"], [[k, v["all"]] for k, v in iou.items()], floatfmt=".4f")
        if len(results) == 2:
            a, b = (r.masker for r in results)
            both = sum(int((a.mask_[n] & b.mask_[n]).sum()) for n in a.mask_)
            report.key_values({
                f"kept by {results[0].task.name} only": sum(int((a.mask_[n] & ~b.mask_[n]).sum()) for n in a.mask_),
                f"kept by {results[1].task.name} only": sum(int((b.mask_[n] & ~a.mask_[n]).sum()) for n in a.mask_),
                "kept by both": both,
                "IoU expected of independent masks": _independent_iou(a.density_, b.density_),
            })
    fig, axes = report.figure_axes(width=9, height=3.4, ncols=2)
    for r in results:
        layers = list(r.masker.layer_density_)
        axes[0].plot(layers, list(r.masker.layer_density_.values()), marker="o", label=r.task.name)
        steps = np.arange(1, len(r.masker.history_) + 1)
        axes[1].plot(steps, [h["density"] for h in r.masker.history_], label=f"{r.task.name}: density")
    for key, v in iou.items():
        axes[0].plot([int(k) for k in v["by_layer"]], list(v["by_layer"].values()), linestyle="--", label=f"IoU {key}")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("kept fraction / IoU")
    axes[0].set_title("density per layer")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("step")
    axes[1].set_title("expected density during training")
    axes[1].legend(fontsize=7)
    report.figure(fig, "density", "Kept fraction per transformer layer (and per-layer IoU), and during training.")
    roles = sorted({role for r in results for role in r.masker.role_density_})
    report.table(["task", *roles], [[r.task.name, *(r.masker.role_density_.get(k, float("nan")) for k in roles)]
                                    for r in results], floatfmt=".4f", caption="Kept fraction per kind of weight.")
    return report


def _independent_iou(p: float, q: float) -> float:
    """E[IoU] of two independent random masks of densities p and q: pq / (p + q − pq)."""
    union = p + q - p * q
    return p * q / union if union else 1.0


@dataclass
class MaskTask:
    """A task to learn a mask for: training texts and held-out texts of the same kind."""

    name: str
    train: TextClassificationData | list[str]
    test: TextClassificationData | list[str]


@dataclass
class MaskResult:
    task: MaskTask
    masker: SubnetworkMasker
    scores: dict[str, float]  # full, mask, inverted, random
