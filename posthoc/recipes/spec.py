"""A recipe as data: variables, then steps that name their inputs and outputs; parsed and checked up front.

    name: task_soup
    description: one line for `posthoc recipe list`
    variables:                  # defaults; `--set key=value` overrides, `profiles` bundles overrides
      steps: 100
    profiles:
      reduced: {steps: 2}       # the few-step setting the test suite runs
    steps:
      - name: ft-bbc            # unique; defaults to the kind and its position
        step: finetune          # the kind (see `posthoc.recipes.registry.STEP_KINDS`)
        base: asset:minilm      # keys are the kind's parameters; path keys are inputs or outputs
        data: data/bbc.json
        out: finetune/bbc
        steps: ${steps}         # a whole-string reference keeps the variable's type
      - name: lang
        step: finetune
        for_each: {lang: [de, fr]}   # one step per value, named lang-de, lang-fr; ${lang} inside
        ...

Every check that can fail is done before the first step runs, so a typo costs nothing: an unknown kind
or key (the valid ones are listed), a missing required key, a value of the wrong type, a path that
leaves the work directory, an input that no earlier step produces and that is not on disk.

Paths are relative to the work directory and may not leave it (no absolute paths, no `..` above it, no
symbolic link out of it), except values given on the command line (`--set base=/models/x`): those are the
user's own choice. `asset:NAME` names a packaged model or data set (see `posthoc.recipes.assets`).
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posthoc.errors import RecipeError
from posthoc.recipes.assets import asset_path

TOP_LEVEL_KEYS = ("name", "description", "variables", "profiles", "steps")
STEP_META_KEYS = ("name", "step", "for_each")
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ASSET_PREFIX = "asset:"


@dataclass
class StepSpec:
    """One step after variable substitution: its kind, its parameters, and its resolved paths."""

    name: str
    kind: str
    params: dict[str, Any]  # raw values, paths still as written (after substitution)
    inputs: list[Path] = field(default_factory=list)  # every input path, flattened
    outputs: list[Path] = field(default_factory=list)
    resolved: dict[str, Any] = field(default_factory=dict)  # params with path strings replaced by Paths


@dataclass
class Recipe:
    name: str
    description: str
    source: Path | None
    variables: dict[str, Any]
    steps: list[StepSpec]
    work_dir: Path
    profile: str | None = None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file; `posthoc recipe list` shows the bundled ones")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    return data


def build_recipe(
    data: Mapping[str, Any],
    work_dir: str | Path,
    *,
    source: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
    kinds: Mapping[str, Any],
) -> Recipe:
    """Check the recipe and resolve variables and paths; `kinds` is the step registry (name -> StepKind)."""
    where = str(source) if source else "recipe"
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    name = str(data.get("name") or (source.stem if source else "recipe"))
    variables = dict(data.get("variables") or {})
    if not isinstance(variables, dict):
        raise RecipeError(f"{where}: 'variables' must be a mapping of name: default value")
    profiles = data.get("profiles") or {}
    from_cli: set[str] = set()
    if profile is not None:
        if profile not in profiles:
            valid = ", ".join(profiles) or "none"
            raise RecipeError(f"{where}: no profile {profile!r}; profiles of this recipe: {valid}")
        _apply(variables, profiles[profile], f"{where}: profile {profile!r}")
    if overrides:
        _apply(variables, overrides, "--set")
        from_cli = set(overrides)
    work_dir = Path(work_dir).expanduser().absolute()
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RecipeError(f"{where}: 'steps' must be a non-empty list of steps")

    steps: list[StepSpec] = []
    produced: list[Path] = []  # outputs of the steps so far
    for position, raw in enumerate(raw_steps, 1):
        for spec in _expand(raw, position, variables, from_cli, where, kinds):
            _resolve_paths(spec, kinds[spec.kind], work_dir, from_cli, where)
            if any(spec.name == s.name for s in steps):
                raise RecipeError(f"{where}: two steps are named {spec.name!r}; step names must be unique")
            for path in spec.inputs:
                if not _is_produced(path, produced) and not path.exists():
                    raise RecipeError(
                        f"{where}: step {spec.name!r}: input {_show(path, work_dir)} is produced by no earlier step "
                        f"and is not on disk; earlier steps produce: {_listing(produced, work_dir)}"
                    )
            for path in spec.outputs:
                clash = next((p for p in produced if path == p or _inside(path, p) or _inside(p, path)), None)
                if clash is not None:
                    raise RecipeError(
                        f"{where}: step {spec.name!r}: output {_show(path, work_dir)} overlaps the output "
                        f"{_show(clash, work_dir)} of an earlier step; give each step its own output"
                    )
                if any(path == i or _inside(i, path) for i in spec.inputs):
                    raise RecipeError(f"{where}: step {spec.name!r}: output {_show(path, work_dir)} is also its input")
            produced += spec.outputs
            steps.append(spec)
    return Recipe(name, str(data.get("description", "")), source, variables, steps, work_dir, profile)


# ------------------------------------------------------------------------------------------- variables


def _apply(variables: dict[str, Any], overrides: Any, where: str) -> None:
    if not isinstance(overrides, Mapping):
        raise RecipeError(f"{where}: expected a mapping of variable: value")
    for key, value in overrides.items():
        if key not in variables:
            valid = ", ".join(sorted(variables)) or "none"
            raise RecipeError(f"{where}: unknown variable {key!r}; variables of this recipe: {valid}")
        variables[key] = value


def substitute(value: Any, variables: Mapping[str, Any], where: str) -> Any:
    """Replace `${name}` everywhere in a nested value; a string that is one reference keeps the value's type.

    A mapping with a `for_each` key is expanded: its other entries are repeated for every value (or every
    combination of values), e.g. `{for_each: {lang: [de, fr]}, "${lang}": "stacked/${lang}"}` becomes
    `{de: stacked/de, fr: stacked/fr}`.
    """
    if isinstance(value, dict) and "for_each" in value:
        loops = substitute(value["for_each"], variables, where)
        if not isinstance(loops, dict) or any(not isinstance(v, list) for v in loops.values()):
            raise RecipeError(f"{where}: 'for_each' must map a name to a list, e.g. {{lang: [de, fr]}}")
        expanded: dict[Any, Any] = {}
        for combination in itertools.product(*loops.values()):
            scope = {**variables, **dict(zip(loops, combination))}
            for k, v in value.items():
                if k != "for_each":
                    expanded[substitute(k, scope, where)] = substitute(v, scope, where)
        return expanded
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole:
            return copy.deepcopy(_lookup(whole.group(1), variables, where))
        return REFERENCE.sub(lambda m: str(_lookup(m.group(1), variables, where)), value)
    if isinstance(value, list):
        return [substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {substitute(k, variables, where): substitute(v, variables, where) for k, v in value.items()}
    return value


def _lookup(name: str, variables: Mapping[str, Any], where: str) -> Any:
    if name not in variables:
        valid = ", ".join(sorted(variables)) or "none"
        raise RecipeError(f"{where}: unknown variable ${{{name}}}; variables: {valid}")
    return variables[name]


def _expand(
    raw: Any, position: int, variables: dict[str, Any], from_cli: set[str], where: str, kinds: Mapping[str, Any]
) -> Iterable[StepSpec]:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: step {position} must be a mapping with a 'step' key")
    kind = raw.get("step")
    if kind not in kinds:
        label = f"step {position}" + (f" ({raw['name']!r})" if "name" in raw else "")
        shown = "no 'step' key" if kind is None else f"unknown step kind {kind!r}"
        raise RecipeError(f"{where}: {label}: {shown}; valid kinds: {', '.join(sorted(kinds))}")
    base_name = str(raw.get("name") or f"{kind}-{position}")
    step_where = f"{where}: step {base_name!r}"
    valid = [*STEP_META_KEYS, *kinds[kind].parameters]
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise RecipeError(f"{step_where}: unknown key {unknown[0]!r} for a {kind} step; valid keys: {', '.join(valid)}")
    loops = substitute(raw.get("for_each") or {}, variables, step_where)
    if not isinstance(loops, dict) or any(not isinstance(v, list) or not v for v in loops.values()):
        raise RecipeError(f"{step_where}: 'for_each' must map a name to a non-empty list, e.g. {{lang: [de, fr]}}")
    clash = [k for k in loops if k in variables]
    if clash:
        raise RecipeError(f"{step_where}: for_each name {clash[0]!r} is already a variable; pick another name")
    params = {k: v for k, v in raw.items() if k not in STEP_META_KEYS}
    for combination in itertools.product(*loops.values()) if loops else [()]:
        scope = {**variables, **dict(zip(loops, combination))}
        suffix = "".join(f"-{v}" for v in combination)
        spec = StepSpec(base_name + suffix, kind, substitute(params, scope, step_where))
        spec.params["__cli__"] = {k: variables.get(k) for k in from_cli}  # the variables given on the command line
        spec.params["__raw__"] = params
        yield spec


# ----------------------------------------------------------------------------------------------- paths


def _resolve_paths(spec: StepSpec, kind: Any, work_dir: Path, from_cli: set[str], where: str) -> None:
    raw = spec.params.pop("__raw__")
    cli = spec.params.pop("__cli__")
    where = f"{where}: step {spec.name!r}"
    kind.check(spec.params, where)
    resolved = dict(spec.params)
    cli_paths = [
        Path(v).expanduser().resolve() for v in cli.values() if isinstance(v, str) and v and not v.startswith(ASSET_PREFIX)
    ]
    for key, role in kind.paths.items():
        if key not in spec.params or spec.params[key] is None:
            continue
        trusted = _from_command_line(raw.get(key), set(cli))

        def convert(value: str, key: str = key, trusted: bool = trusted) -> Path:
            # A leaf inside a nested value (e.g. an `encoders` table) is the user's own when it is, or lies
            # inside, a path given on the command line.
            own = trusted or _under_any(value, cli_paths)
            return resolve_path(value, work_dir, own, f"{where}: {key}")

        resolved[key] = _map_strings(spec.params[key], kind.path_leaves(key), convert)
        found = _collect_paths(resolved[key])
        (spec.inputs if role == "input" else spec.outputs).extend(found)
    spec.resolved = resolved


def _from_command_line(raw: Any, cli: set[str]) -> bool:
    """A path value is the user's own when it starts with a variable set on the command line."""
    if not isinstance(raw, str):
        return False
    match = REFERENCE.match(raw)
    return bool(match and match.start() == 0 and match.group(1) in cli)


def resolve_path(value: str, work_dir: Path, trusted: bool, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: expected a path, got {value!r}")
    if value.startswith(ASSET_PREFIX):
        return asset_path(value[len(ASSET_PREFIX) :], where)
    path = Path(value).expanduser()
    if trusted:
        return path.absolute()
    if path.is_absolute():
        raise RecipeError(
            f"{where}: {value!r} is an absolute path; paths in a recipe stay inside its work directory "
            f"({work_dir}); give outside paths on the command line (--set NAME=PATH)"
        )
    target = (work_dir / path).resolve()
    if not _inside(target, work_dir.resolve()) and target != work_dir.resolve():
        raise RecipeError(
            f"{where}: {value!r} leaves the work directory {work_dir}; paths in a recipe stay inside it "
            "(give outside paths on the command line with --set NAME=PATH)"
        )
    return work_dir / path


def _map_strings(value: Any, leaves: tuple[str, ...] | None, convert: Any) -> Any:
    """Convert the path strings of a value: all of them (leaves None) or only those under these dict keys."""
    if isinstance(value, str):
        return convert(value) if leaves is None else value
    if isinstance(value, list):
        return [_map_strings(v, leaves, convert) for v in value]
    if isinstance(value, dict):
        return {
            k: (_map_strings(v, None, convert) if leaves is not None and k in leaves else _map_strings(v, leaves, convert))
            for k, v in value.items()
        }
    return value


def _collect_paths(value: Any) -> list[Path]:
    if isinstance(value, Path):
        return [value]
    if isinstance(value, list):
        return [p for v in value for p in _collect_paths(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _collect_paths(v)]
    return []


def _under_any(value: Any, parents: list[Path]) -> bool:
    if not isinstance(value, str) or not value or not parents or not Path(value).expanduser().is_absolute():
        return False
    path = Path(value).expanduser().resolve()
    return any(path == parent or _inside(path, parent) for parent in parents)


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
    except ValueError:
        return False
    return path != parent


def _is_produced(path: Path, produced: list[Path]) -> bool:
    return any(path == p or _inside(path, p) for p in produced)


def _show(path: Path, work_dir: Path) -> str:
    try:
        return str(path.relative_to(work_dir))
    except ValueError:
        return str(path)


def _listing(paths: list[Path], work_dir: Path) -> str:
    return ", ".join(_show(p, work_dir) for p in paths) or "nothing (it is the first step)"
