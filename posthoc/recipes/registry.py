"""The registry of step kinds: a step kind is one typed function, and its signature is its schema.

    @step_kind("finetune", inputs=("base", "data"), outputs=("out",))
    def finetune_step(ctx: StepContext, *, base: Path, data: Path, out: Path, steps: int = 50) -> dict:
        ...

The keyword parameters are the YAML keys the step accepts (those without a default are required); their
annotations are checked before anything runs; `inputs` and `outputs` say which keys hold paths (a path
key may hold one path, a list of paths, or a mapping whose string values are paths; `leaves` narrows a
mapping to some sub-keys, e.g. `tasks.*.data`). The function receives those values as `Path`s, writes its
outputs (atomically: each output appears whole or not at all) and returns a small JSON-able summary.
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posthoc.errors import RecipeError

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What a running step may use besides its parameters."""

    name: str
    work_dir: Path
    threads: int | None = None
    progress: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepKind:
    name: str
    fn: Callable[..., dict[str, Any] | None]
    paths: dict[str, str]  # key -> "input" | "output"
    leaves: dict[str, tuple[str, ...]]  # path key -> the sub-keys holding paths (absent: every string)
    hints: dict[str, Any]
    defaults: dict[str, Any]  # parameter -> default (inspect.Parameter.empty when required)
    doc: str

    @property
    def parameters(self) -> list[str]:
        return list(self.hints)

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def path_leaves(self, key: str) -> tuple[str, ...] | None:
        return self.leaves.get(key)

    def check(self, params: dict[str, Any], where: str) -> None:
        """Required keys present, every value of its declared type (a path is a string here)."""
        missing = [k for k, d in self.defaults.items() if d is inspect.Parameter.empty and k not in params]
        if missing:
            raise RecipeError(f"{where}: a {self.name} step needs the key {missing[0]!r}")
        for key, value in params.items():
            hint = self.hints[key]
            if not _matches(value, hint):
                raise RecipeError(
                    f"{where}: The {key!r} key of a {self.name} step must be {_describe(hint)}. Got {value!r} instead."
                )


STEP_KINDS: dict[str, StepKind] = {}


def step_kind(
    name: str,
    *,
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    leaves: dict[str, tuple[str, ...]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in STEP_KINDS:
            raise ValueError(f"step kind {name!r} is registered twice")
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        params = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        declared = {p.name: hints.get(p.name, Any) for p in params}
        for key in (*inputs, *outputs):
            if key not in declared:
                raise ValueError(f"step kind {name!r}: path key {key!r} is not a parameter")
        paths = {**dict.fromkeys(inputs, "input"), **dict.fromkeys(outputs, "output")}
        STEP_KINDS[name] = StepKind(
            name, fn, paths, dict(leaves or {}), declared, {p.name: p.default for p in params}, fn.__doc__ or ""
        )
        return fn

    return register


def run_step(kind: StepKind, ctx: StepContext, resolved: dict[str, Any]) -> dict[str, Any]:
    arguments = {k: v for k, v in resolved.items()}
    return kind.fn(ctx, **arguments) or {}


# --------------------------------------------------------------------------------------------- types


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Path:  # written as a string (or asset:NAME) in the recipe
        return isinstance(value, str)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key_hint, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, key_hint) and _matches(v, item) for k, v in value.items())
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if hint is Path:
        return "a path"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}" if typing.get_args(hint) else "a list"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if isinstance(hint, type):
        return {"int": "an int", "float": "a number", "str": "a string", "bool": "true or false"}.get(
            hint.__name__, hint.__name__
        )
    return str(hint)
