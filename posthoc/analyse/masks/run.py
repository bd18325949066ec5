"""`posthoc split mask`: parse the tasks, learn one mask per task, write masks, scores and the report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from posthoc.analyse.calibration import CalibrationData, load_calibration
from posthoc.analyse.masks.masker import SubnetworkMasker
from posthoc.analyse.masks.report import MaskResult, MaskTask, mask_report, summary
from posthoc.checkpoint import check_output_location, open_checkpoint
from posthoc.data import TextClassificationData, stratified_split
from posthoc.errors import DataError
from posthoc.modules.format import BaseRef
from posthoc.modules.masks import apply_mask, staged_output


def parse_task(spec: str, *, train_per_class: int | None = None, test_per_class: int | None = None,
               seed: int = 0) -> MaskTask:
    """`DATA[:class,class,...]` -> MaskTask. DATA: 'bbc', 'folders:DIR' (labelled: classification, split 70/10/20
    stratified), or a text file/directory (language modelling: the last 20 % of texts held out)."""
    data_spec, classes, data = spec, None, None
    head, sep, tail = spec.rpartition(":")
    if sep and head:  # "DATA:class,class" when DATA is labelled data and the tail names its classes
        try:
            whole = load_calibration(head)
        except DataError:
            whole = None
        names = [c.strip() for c in tail.split(",") if c.strip()]
        if whole is not None and whole.labels is not None and ("," in tail or (names and names[0] in whole.label_names)):
            data_spec, classes, data = head, names, whole
    if data is None:
        data = load_calibration(data_spec)
    if data.labels is None:
        if classes:
            raise DataError(f"--task {spec!r}: {data_spec} has no labels, so classes cannot be chosen")
        train, test = CalibrationData.split(data, 0.2, seed=seed)
        return MaskTask(Path(data_spec).stem or data_spec, list(train.texts), list(test.texts))
    labelled = TextClassificationData(data.texts, data.labels, data.label_names, data.name)
    if classes:
        labelled = labelled.subset(classes)
    split = stratified_split(labelled, seed=seed)
    name = "+".join(classes) if classes else data_spec.replace(":", "_")
    return MaskTask(name, split.train.limit_per_class(train_per_class), split.test.limit_per_class(test_per_class))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_+." else "_" for ch in name)


def learn_masks(model: Any, tasks: list[MaskTask], **params: Any) -> list[MaskResult]:
    """Fit one SubnetworkMasker per task (same parameters) and score each on its held-out texts."""
    if not tasks:
        raise DataError("give at least one task to learn a mask for")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise DataError(f"two tasks have the same name ({names}); name them apart")
    results = []
    for task in tasks:
        masker = SubnetworkMasker(**params).fit(model, task.train)
        scores = {which: masker.score(task.test, which) for which in ("full", "mask", "inverted", "random")}
        results.append(MaskResult(task, masker, scores))
    return results


def split_mask(model: str | os.PathLike[str], out_dir: str | os.PathLike[str], tasks: list[MaskTask], *,
               force: bool = False, pruned: bool = False, progress: bool = True, **params: Any) -> list[MaskResult]:
    """The whole command: learn, score, compare, write report + modules (+ pruned checkpoints)."""
    check_output_location(Path(out_dir), [Path(model)], force)
    started = time.perf_counter()
    results = learn_masks(model, tasks, progress=progress, **params)
    source = str(results[0].masker.source_ or model)
    with staged_output(out_dir, protect=[Path(results[0].masker.source_ or model)], force=force) as staging:
        data = summary(results)
        data["seconds"] = time.perf_counter() - started
        (staging / "masks.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
        with open_checkpoint(results[0].masker.source_) as base:
            base_ref = BaseRef.of(base)
        for r in results:
            module = r.masker.save(staging / "masks" / _safe(r.task.name), name=r.task.name, base_ref=base_ref,
                                   provenance={"scores": r.scores, "train": len(r.task.train)})
            if pruned:
                apply_mask(r.masker.source_, module, staging / "pruned" / _safe(r.task.name), progress=progress)
        mask_report(results, source).write(staging)
    return results
