"""One registry of merge methods. A method is a pure tensor function; its signature is its schema.

A method is registered with `@merge_method(...)`. Its keyword-only parameters are its YAML
parameters: the Python default is the mergekit default, `Required` marks a parameter without
default, and `Annotated[..., Param(...)]` carries the scope and the valid range::

    @merge_method("linear", base="ignored", paper="https://arxiv.org/abs/2203.05482")
    def linear(tensors, base, *, weight: PerModel = Required, normalize: bool = True) -> Tensor: ...

Per-model parameters arrive as one value per input (`PerModel`), global ones as scalars; a parameter
annotated `int` (or `list[int]`) arrives as an int, `bool` as a bool, anything else as a float. Randomized
methods take a `generator` keyword. What the module-merge path may assume of a method (`linear`,
`on_task_vectors`) is declared at registration too. The engine, the config reader, the CLI help and the
tests all read the same declaration; nothing else lists methods or parameters.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

from posthoc.errors import ConfigError, PosthocError


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

    def range_text(self, integer: bool = False) -> str:
        """What a valid value is, for messages: "a number in (0, 1]", "an integer in [1, inf)", "a number"."""
        kind = "an integer" if integer else "a number"
        if self.low is None and self.high is None:
            return kind
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else _bound_text(self.low, integer)
        high = "inf" if self.high is None else _bound_text(self.high, integer)
        return f"{kind} in {left}{low}, {high}{right}"

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


def _bound_text(bound: float, integer: bool) -> str:
    return str(int(bound)) if integer and float(bound).is_integer() else f"{bound:g}"


PER_MODEL = Param(per_model=True)
DENSITY = Param(per_model=True, low=0.0, high=1.0, low_open=True, doc="fraction of entries kept")
PerModel = Annotated[list[float], PER_MODEL]
Density = Annotated[list[float], DENSITY]


@dataclass(frozen=True)
class ParamSpec:
    name: str  # as written in YAML (`lambda`, not `lambda_`)
    argument: str  # the Python keyword
    kind: type  # float, int or bool
    default: Any
    scope: Param

    @property
    def required(self) -> bool:
        return self.default is Required

    def validate(self, value: Any, where: str) -> float | int | bool:
        """The value as the method receives it (a bool, an int or a float), or a ConfigError naming it."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ConfigError(f"parameter {self.name!r} {where} must be true or false, got {value!r}")
        integer = self.kind is int
        try:
            number = float(value)
        except (TypeError, ValueError):
            wanted = "an integer" if integer else "a number"
            raise ConfigError(f"parameter {self.name!r} {where} must be {wanted}, got {value!r}") from None
        whole = not integer or number.is_integer()  # YAML `10` and `10.0` are both the integer 10
        if isinstance(value, bool) or not whole or not self.scope.contains(number):
            raise ConfigError(
                f"parameter {self.name!r} {where} must be {self.scope.range_text(integer)}, got {value!r}"
            )
        return int(number) if integer else number


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
    # What merging modules (posthoc.merge.modules) may assume; nothing there goes by a method's name.
    # linear: the output is a combination Σ aᵢθᵢ (+ a₀θ₀) of the inputs whose coefficients depend on the
    # parameters only; where they sum to one it is θ₀ + Σ cᵢ(θᵢ − θ₀), so changes merge as Σ cᵢφᵢ (the cᵢ
    # are read off the function on unit inputs: `posthoc.merge.modules.linear_coefficients`).
    linear: bool = False
    # on_task_vectors: defined on task vectors, f(θ₀ + φ; θ₀) = θ₀ + f(φ; 0) with the same seed, so changes
    # merge over a zero base, without the base checkpoint.
    on_task_vectors: bool = False

    def merge_tensor(self, tensor: str, tensors: list[torch.Tensor], base: torch.Tensor | None, **kwargs: Any
                     ) -> torch.Tensor:
        """The method on the inputs of one tensor; a PosthocError it raises is reported with the tensor's name."""
        try:
            return self.fn(tensors, base, **kwargs)
        except PosthocError as error:
            raise type(error)(f"tensor {tensor}: {error}") from None

    def describe(self) -> str:
        """The parameters in one line: `name (per model|global[, integer], default)`."""
        parts = []
        for p in self.params.values():
            default = "required" if p.required else repr(p.default)
            scope = "per model" if p.scope.per_model else "global"
            kind = ", integer" if p.kind is int else ""
            parts.append(f"{p.name} ({scope}{kind}, {default})")
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
        if typing.get_origin(hint) is Annotated:
            base_hint, *extras = typing.get_args(hint)
            scope = next((e for e in extras if isinstance(e, Param)), scope)
            hint = base_hint
        if typing.get_origin(hint) is list:  # per-model values: the kind of one
            hint = typing.get_args(hint)[0]
        kind: type = hint if hint in (bool, int) else float
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
    linear: bool = False,
    on_task_vectors: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a pure tensor function as merge method `name` (the flags: see MergeMethod)."""

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        signature = inspect.signature(fn).parameters
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        register(
            MergeMethod(
                name, fn, _param_specs(fn), base, min_models, max_models, "generator" in signature, paper, summary,
                takes_out_dtype="out_dtype" in signature, reads_row_chunks=reads_row_chunks, linear=linear,
                on_task_vectors=on_task_vectors,
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
