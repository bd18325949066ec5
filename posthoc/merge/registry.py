"""One registry of merge methods. A method is a pure tensor function; its signature is its schema.

A method is registered with `@merge_method(...)`. Its keyword-only parameters are its YAML
parameters: the Python default is the mergekit default, `Required` marks a parameter without
default, and `Annotated[..., Param(...)]` carries the scope and the valid range::

    @merge_method("linear", base="ignored", paper="https://arxiv.org/abs/2203.05482")
    def linear(tensors, base, *, weight: PerModel = Required, normalize: bool = True) -> Tensor: ...

Per-model parameters arrive as one float per input (`PerModel`), global ones as scalars. Randomized
methods take a `generator` keyword. The engine, the config reader, the CLI help and the tests all read
the same declaration; nothing else lists methods or parameters.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

from posthoc.errors import ConfigError


class _RequiredType:
    def __repr__(self) -> str:
        return "required"


Required: Any = _RequiredType()


@dataclass(frozen=True)
class Param:
    """Scope and valid range of a parameter; attached with `Annotated`."""

    per_model: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    def range_text(self) -> str:
        if self.low is None and self.high is None:
            return "any number"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"a number in {left}{low}, {high}{right}"

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


PER_MODEL = Param(per_model=True)
DENSITY = Param(per_model=True, low=0.0, high=1.0, low_open=True, doc="fraction of entries kept")
PerModel = Annotated[list[float], PER_MODEL]
Density = Annotated[list[float], DENSITY]


@dataclass(frozen=True)
class ParamSpec:
    name: str  # as written in YAML (`lambda`, not `lambda_`)
    argument: str  # the Python keyword
    kind: type  # float or bool
    default: Any
    scope: Param

    @property
    def required(self) -> bool:
        return self.default is Required

    def validate(self, value: Any, where: str) -> float | bool:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ConfigError(f"parameter {self.name!r} {where} must be true or false, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"parameter {self.name!r} {where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not self.scope.contains(number):
            raise ConfigError(f"parameter {self.name!r} {where} must be {self.scope.range_text()}, got {value!r}")
        return number


Base = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    params: dict[str, ParamSpec]
    base: Base  # "ignored": a configured base is one more ordinary input
    min_models: int  # counted over inputs other than a required/optional base
    max_models: int | None
    randomized: bool
    paper: str
    summary: str = field(default="")
    # Checks that involve several parameters at once (ranges of single ones live in Param).
    validate: Callable[[dict[str, Any], str], None] | None = None
    # Accepts `out_dtype=` and then returns its result in that dtype (saves a full-size float32 copy).
    takes_out_dtype: bool = False
    # Reads its inputs only as flat slices of whole rows (`t.reshape(-1)[a:b]`), so the engine may hand it
    # very large inputs as lazy row readers (`posthoc.merge.engine.LazyTensor`) instead of tensors.
    reads_row_chunks: bool = False

    def describe(self) -> str:
        parts = []
        for p in self.params.values():
            default = "required" if p.required else repr(p.default)
            scope = "per model" if p.scope.per_model else "global"
            parts.append(f"{p.name} ({scope}, {default})")
        return ", ".join(parts) or "no parameters"


REGISTRY: dict[str, MergeMethod] = {}


def _param_specs(fn: Callable[..., Any]) -> dict[str, ParamSpec]:
    hints = typing.get_type_hints(fn, include_extras=True)
    specs = {}
    for argument, parameter in inspect.signature(fn).parameters.items():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or argument in ("generator", "out_dtype"):
            continue
        hint = hints[argument]
        scope = Param()
        kind: type = float
        if typing.get_origin(hint) is Annotated:
            base_hint, *extras = typing.get_args(hint)
            scope = next((e for e in extras if isinstance(e, Param)), scope)
            hint = base_hint
        if hint is bool:
            kind = bool
        name = argument.rstrip("_")
        specs[name] = ParamSpec(name, argument, kind, parameter.default, scope)
    return specs


def merge_method(
    name: str,
    *,
    base: Base,
    paper: str,
    min_models: int = 1,
    max_models: int | None = None,
    reads_row_chunks: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a pure tensor function as merge method `name`."""

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        signature = inspect.signature(fn).parameters
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        register(
            MergeMethod(
                name, fn, _param_specs(fn), base, min_models, max_models, "generator" in signature, paper, summary,
                takes_out_dtype="out_dtype" in signature, reads_row_chunks=reads_row_chunks,
            )
        )
        return fn

    return decorate


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry; a second method of the same name is a programming error."""
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    method = REGISTRY.get(name)
    if method is None:
        raise ConfigError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(REGISTRY))}")
    return method
