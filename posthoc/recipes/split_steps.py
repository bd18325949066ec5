"""The `split` step: find modules inside a trained dense model, with posthoc's analysers (`posthoc split …`).

    - name: moe
      step: split
      method: moe              # moe (MoE-fication, posthoc.analyse.moe.run), cluster (neuron communities,
                               # posthoc.analyse.cluster.run) or mask (one subnetwork mask per task,
                               # posthoc.analyse.masks.run)
      model: finetune/bbc
      calib: data/bbc.json     # a recipe data file: its `split` texts calibrate (moe, cluster)
      parameters: {experts: 16, top_k: 4}   # the analyser's own parameters, checked by its parameter table
      out: split/moe

For `mask`, `tasks` maps a task name to a data file (+ `language` for parallel text): each task learns a
mask on its train split and is scored on its test split. The step writes what `posthoc split METHOD` writes.

The analyser a step uses is imported when the step runs: validating any recipe imports this module, and the
three analysers would add a sixth to that (0.2 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from posthoc.analyse.calibration import CalibrationData
from posthoc.errors import ConfigError
from posthoc.recipes.datasets import read_dataset
from posthoc.recipes.registry import StepContext, step_kind


def calibration_data(path: Path, split: str | None, language: str | None, max_texts: int | None) -> CalibrationData:
    """A recipe data file as the analysers' CalibrationData (labels kept when the data set has them)."""
    dataset = read_dataset(path)
    part = dataset.part(split)[: max_texts or None]
    texts = tuple(dataset.text(e, language) for e in part)
    labelled = bool(dataset.label_names) and all(e.get("label") is not None for e in part)
    labels = tuple(int(e["label"]) for e in part) if labelled else None
    return CalibrationData(texts, labels, dataset.label_names if labelled else (), f"{dataset.name}/{split or 'all'}")


@step_kind("split", inputs=("model", "calib", "tasks"), outputs=("out",), leaves={"tasks": ("data",)})
def split_step(
    ctx: StepContext,
    *,
    model: Path,
    out: Path,
    method: Literal["moe", "cluster", "mask"],
    calib: Path | None = None,
    calib_split: Literal["train", "validation", "test"] | None = "train",
    language: str | None = None,
    max_texts: int | None = None,
    tasks: dict[str, dict[str, Any]] | None = None,
    parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Split `model` into modules (MoE experts, neuron clusters or task masks); writes what `posthoc split` writes."""
    params = {"progress": ctx.progress, **(parameters or {})}
    if ctx.threads is not None:
        params.setdefault("threads", ctx.threads)
    data = calibration_data(calib, calib_split, language, max_texts) if calib is not None else None
    if method == "moe":
        from posthoc.analyse.moe.run import moefy

        if data is None:
            raise ConfigError("a moe split needs `calib`: a data file whose texts calibrate the experts")
        result = moefy(model, out, data, force=True, **params)
        return {k: v for k, v in result.summary.items() if k in ("fitted", "dense", "recall", "seconds")}
    if method == "cluster":
        from posthoc.analyse.cluster.run import split_cluster

        labels = data if data is not None and data.labels is not None else None
        clusterer = split_cluster(model, out, data, labels=labels, force=True, **params)
        return {"modular": {k: None if v is None else bool(v) for k, v in clusterer.modular_.items()},
                "clusters": len(clusterer.clusters_)}  # fmt: skip
    from posthoc.analyse.masks.run import MaskTask, split_mask

    if not tasks:
        raise ConfigError("a mask split needs `tasks`: {name: {data: FILE, language: LANG (parallel text)}}")
    mask_tasks = []
    for name, spec in tasks.items():
        dataset = read_dataset(spec["data"])
        if dataset.label_names:
            train = dataset.classification("train", spec.get("language"), spec.get("per_class"))
            test = dataset.classification("test", spec.get("language"), spec.get("per_class"))
        else:
            train, test = dataset.texts("train", spec.get("language")), dataset.texts("test", spec.get("language"))
        mask_tasks.append(MaskTask(name, train, test))
    progress = params.pop("progress")
    results = split_mask(model, out, mask_tasks, force=True, progress=progress, **params)
    return {"tasks": {r.task.name: {"density": float(r.masker.density_), **{k: float(v) for k, v in r.scores.items()}}
                      for r in results}}  # fmt: skip
