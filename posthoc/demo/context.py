"""What the demo's steps share: its settings, its tasks and inputs, the context each later step gets, the
digests their caches are keyed by and the one pass that embeds every task's texts."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posthoc.assets import minilm_dir
from posthoc.data import DataSplit, TextClassificationData, load_bbc, stratified_split
from posthoc.errors import ConfigError
from posthoc.finetune import ClassificationHead, FinetuneSettings
from posthoc.models import Encoder


@dataclass(frozen=True)
class DemoContext:
    """What the demo's steps after the fine-tunes get: probes, merges, and the later steps (modules,
    MoE-fication, clusters, task soup).

    A later step is a `DemoStep`, `step(context) -> str`: it does its work under `work_dir / <its own
    folder>` (cached there like the fine-tunes), and returns the text block the demo prints after the
    merge table.
    """

    work_dir: Path
    base_dir: Path  # the base encoder checkpoint (all-MiniLM-L6-v2 unless a test passes a tiny one)
    finetuned: dict[str, Path]  # task name -> fine-tuned encoder dir (its head saved beside, see ClassificationHead)
    heads: dict[str, ClassificationHead]  # task name -> the head fine-tuned with it
    splits: dict[str, DataSplit]  # task name -> train/validation/test of that task's labels
    settings: DemoSettings
    fresh: bool
    threads: int | None
    progress: bool


DemoStep = Callable[[DemoContext], str]


@dataclass(frozen=True)
class Task:
    """A classification task cut from a corpus: a name and the classes it keeps."""

    name: str
    label_names: tuple[str, ...]


# Every BBC class pair is easy for a linear probe on the frozen base; these tasks each hold one of the
# hardest pairs (business/politics 0.95, entertainment/tech 0.99 probe accuracy on the validation split,
# against 1.00 for sports/tech), so neither task is solved before fine-tuning.
BBC_TASKS = (Task("A", ("business", "politics", "sports")), Task("B", ("entertainment", "tech")))


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's numbers (and so whether a cached result can be reused)."""

    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    tasks: tuple[Task, Task] = BBC_TASKS
    validation: float = 0.1
    test: float = 0.2
    split_seed: int = 0
    # task arithmetic adds both task vectors (weight 1 each) scaled by λ; TIES takes the disjoint mean
    # of the top-`ties_density` entries of each, scaled by λ. λ is picked on validation from these grids.
    task_arithmetic_lambdas: tuple[float, ...] = (0.5, 0.75, 1.0)
    ties_density: float = 0.2
    ties_lambdas: tuple[float, ...] = (1.0, 1.5)
    validation_per_class: int | None = 30  # examples per class that pick λ (None: the whole split)
    test_per_class: int | None = None  # None: the whole test split
    probe_steps: int = 500
    eval_batch_size: int = 64
    task_soup_profile: str = "demo"  # the profile of the bundled task_soup recipe that ends the demo

    def __post_init__(self) -> None:
        if len(self.tasks) != 2:
            raise ConfigError(f"the demo merges two fine-tunes: give two tasks, got {len(self.tasks)}")
        if self.tasks[0].name == self.tasks[1].name:
            raise ConfigError(f"the two tasks need different names, got {self.tasks[0].name!r} twice")
        if not (0 < self.ties_density <= 1):
            raise ConfigError(f"The 'ties_density' setting of the demo must be in (0, 1]. Got {self.ties_density} instead.")
        if not self.task_arithmetic_lambdas or not self.ties_lambdas:
            raise ConfigError("each merge method needs at least one λ to try")


def demo_inputs(
    settings: DemoSettings,
    base_dir: str | os.PathLike[str] | None = None,
    data: TextClassificationData | None = None,
) -> tuple[Path, dict[str, DataSplit]]:
    """The base encoder (the packaged all-MiniLM-L6-v2 unless given) and each task's train/validation/test split."""
    if base_dir is None:
        base_dir = minilm_dir()
    data = data if data is not None else load_bbc()
    split = stratified_split(data, validation=settings.validation, test=settings.test, seed=settings.split_seed)
    return Path(base_dir), {task.name: split.subset(task.label_names) for task in settings.tasks}


def data_digest(data: TextClassificationData) -> str:
    """A digest of texts, labels and label names: a cached artefact is reused only for the very same examples."""
    digest = hashlib.sha256()
    digest.update(json.dumps(data.label_names).encode())
    for text, label in zip(data.texts, data.labels):
        digest.update(f"{label}\0{len(text)}\0".encode())
        digest.update(text.encode())
    return digest.hexdigest()[:16]


def texts_digest(texts: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """A digest of texts (and, when given, the name of each one's class), for the steps whose inputs are
    plain texts: the MoE-fication's calibration texts, the clusters' train texts with their topics.

    Its bytes are not `data_digest`'s: each stays as it was, so the caches of earlier runs stay valid."""
    digest = hashlib.sha256()
    for i, text in enumerate(texts):
        label = "" if labels is None else f"{labels[i]}\0"
        digest.update(f"{len(text)}\0{label}".encode())
        digest.update(text.encode())
    return digest.hexdigest()[:16]


def embed_tasks(
    encoder: Encoder,
    sets: dict[str, TextClassificationData],
    settings: DemoSettings,
    threads: int | None,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Embed the texts of every task in one pass (one model, one batching) and cut the result per task."""
    names = list(sets)
    texts: list[str] = [text for name in names for text in sets[name].texts]
    embeddings = encoder.embed(
        texts,
        batch_size=settings.eval_batch_size,
        max_length=settings.finetune.max_length,
        threads=threads,
        progress=progress,
    )
    out, start = {}, 0
    for name in names:
        out[name] = embeddings[start : start + len(sets[name])]
        start += len(sets[name])
    return out
