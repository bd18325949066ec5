"""Run a recipe: each step in order, skipping those whose outputs exist and whose inputs did not change.

A finished step leaves a record in `WORK/.recipe/STEP.json`: its kind, its settings (the resolved
parameters), the file stamps of every input and output (`file_stamps`: for a file its size and
modification time; for a directory the same for every file below it) and what the step returned. The next
run skips the step when the record matches: same settings, same input stamps, outputs still there as they
were written. A re-run step changes its outputs' stamps, so every step downstream of it runs again.

A step that fails stops the recipe: the error names the step, the steps before it stay on disk with their
records, and the next run starts again at the failed step.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posthoc.errors import PosthocError, RecipeError
from posthoc.recipes.catalog import find_recipe
from posthoc.recipes.registry import STEP_KINDS, StepContext, run_step
from posthoc.recipes.spec import Recipe, StepSpec, build_recipe, load_yaml

log = logging.getLogger(__name__)

RECORDS = ".recipe"


@dataclass
class StepOutcome:
    name: str
    kind: str
    status: str  # "ran" | "skipped"
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeResult:
    recipe: Recipe
    outcomes: list[StepOutcome]

    @property
    def work_dir(self) -> Path:
        return self.recipe.work_dir

    def outcome(self, name: str) -> StepOutcome:
        for o in self.outcomes:
            if o.name == name:
                return o
        raise KeyError(f"no step {name!r}; steps: {[o.name for o in self.outcomes]}")

    def tables(self) -> list[str]:
        return [o.summary["table"] for o in self.outcomes if isinstance(o.summary.get("table"), str)]


def load_recipe(
    recipe: str | os.PathLike[str],
    work_dir: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
) -> Recipe:
    """Parse and check a recipe (a file, or the name of a bundled one) without running anything."""
    _register_step_kinds()
    path = find_recipe(recipe)
    data = load_yaml(path)
    name = str(data.get("name") or path.stem)
    work_dir = Path(work_dir) if work_dir is not None else Path("recipes-output") / name
    return build_recipe(data, work_dir, source=path, overrides=overrides, profile=profile, kinds=STEP_KINDS)


def run_recipe(
    recipe: str | os.PathLike[str],
    work_dir: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
    fresh: bool = False,
    threads: int | None = None,
    progress: bool = False,
    echo: Callable[[str], Any] | None = None,
) -> RecipeResult:
    """Run every step of a recipe (see the module docstring); `echo` receives one line per step."""
    spec = load_recipe(recipe, work_dir, overrides=overrides, profile=profile)
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    (spec.work_dir / RECORDS).mkdir(exist_ok=True)
    outcomes: list[StepOutcome] = []
    for step in spec.steps:
        key = _step_key(step, spec.work_dir)
        record_path = spec.work_dir / RECORDS / f"{step.name}.json"
        record = _read_json(record_path)
        if not fresh and record is not None and record.get("key") == key and _outputs_unchanged(step, record):
            outcome = StepOutcome(step.name, step.kind, "skipped", 0.0, record.get("summary", {}))
            outcomes.append(outcome)
            if echo:
                echo(f"[skip] {step.name} ({step.kind}): inputs and settings unchanged")
            continue
        record_path.unlink(missing_ok=True)
        if echo:
            echo(f"[run]  {step.name} ({step.kind}) ...")
        started = time.perf_counter()
        ctx = StepContext(step.name, spec.work_dir, threads, progress)
        try:
            summary = run_step(STEP_KINDS[step.kind], ctx, step.resolved)
        except PosthocError as error:
            raise RecipeError(_failed(step, spec, outcomes, str(error))) from error
        except Exception as error:  # any failure inside a step (a library bug too) names the step
            raise RecipeError(_failed(step, spec, outcomes, f"{type(error).__name__}: {error}")) from error
        seconds = time.perf_counter() - started
        missing = [p for p in step.outputs if not p.exists()]
        if missing:
            raise RecipeError(_failed(step, spec, outcomes, f"it did not write its output {missing[0]}"))
        record = {
            "key": key,
            "outputs": {str(p): file_stamps(p) for p in step.outputs},
            "summary": summary,
            "seconds": round(seconds, 2),
            "run_id": uuid.uuid4().hex,
        }
        _write_json(record_path, record)
        outcomes.append(StepOutcome(step.name, step.kind, "ran", seconds, summary))
        if echo:
            echo(f"[done] {step.name} in {seconds:.1f} s")
    _write_json(
        spec.work_dir / "recipe-result.json",
        {
            "recipe": spec.name,
            "profile": spec.profile,
            "variables": _jsonable(spec.variables),
            "steps": [{"name": o.name, "kind": o.kind, "status": o.status, "seconds": round(o.seconds, 2)} for o in outcomes],
        },
    )
    return RecipeResult(spec, outcomes)


def _failed(step: StepSpec, spec: Recipe, outcomes: list[StepOutcome], message: str) -> str:
    kept = len(outcomes)
    return (
        f"recipe {spec.name}: step {step.name!r} ({step.kind}) failed: {message.rstrip('.')}. "
        f"The {kept} step(s) before it are kept in {spec.work_dir}; run again to continue from this step"
    )


def _register_step_kinds() -> None:
    """Import the modules whose functions register the step kinds. Here, not at the top: they import torch
    and the library, and `posthoc recipe list` (which imports this module) needs neither."""
    import posthoc.recipes.split_steps  # noqa: F401
    import posthoc.recipes.steps  # noqa: F401
    import posthoc.recipes.vlm  # noqa: F401


# ------------------------------------------------------------------------------------------ file stamps


def file_stamps(path: Path) -> list[Any] | None:
    """Size and modification time of a file, or of every file below a directory (sorted); None if absent."""
    if path.is_file():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    if path.is_dir():
        entries = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                stat = full.stat()
                entries.append([str(full.relative_to(path)), stat.st_size, stat.st_mtime_ns])
        return entries
    return None


def _step_key(step: StepSpec, work_dir: Path) -> dict[str, Any]:
    # A value equal to the kind's default counts as not given: writing a default out changes nothing.
    defaults = STEP_KINDS[step.kind].defaults
    settings = {k: v for k, v in step.resolved.items() if k not in defaults or v != defaults[k]}
    return {
        "kind": step.kind,
        "settings": _jsonable(settings),
        "inputs": {str(p): file_stamps(p) for p in step.inputs},
    }


def _outputs_unchanged(step: StepSpec, record: dict[str, Any]) -> bool:
    recorded = record.get("outputs", {})
    return all(recorded.get(str(p)) is not None and file_stamps(p) == recorded.get(str(p)) for p in step.outputs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
