"""One declared table of parameters per analyser: defaults, valid values, help, and the check.

    PARAMS = ParamTable("MoEfier", [
        Param("experts", 16, "an int >= 1", lambda v, p: is_int(v) and v >= 1, "routed experts per FFN"),
        ...
    ])
    PARAMS.validate(values)  # ConfigError: "The 'top_k' parameter of MoEfier must be an int in
                             #  [1, experts]. Got 0 instead."

The table is the single source of truth: the estimator's defaults, the validation at fit time and the
CLI's help texts all read it (scikit-learn's `_parameter_constraints`, in one place).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from posthoc.errors import ConfigError


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    valid: str  # the valid values, in words, e.g. "an int in [1, experts]"
    check: Callable[[Any, dict[str, Any]], bool]  # (value, all values) -> ok
    help: str
    choices: tuple[str, ...] | None = None  # for CLI choice options


def one_of(*choices: str) -> Callable[[Any, dict[str, Any]], bool]:
    return lambda v, _: v in choices


def choice(name: str, default: str, choices: Sequence[str], help: str) -> Param:
    """A parameter that takes one of a few names (declared once: check, message and CLI choices)."""
    return Param(name, default, f"one of {', '.join(choices)}", lambda v, _: v in choices, help, tuple(choices))


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ParamTable:
    def __init__(self, owner: str, params: Sequence[Param]):
        self.owner = owner
        self.params = {p.name: p for p in params}

    def defaults(self) -> dict[str, Any]:
        return {name: p.default for name, p in self.params.items()}

    def validate(self, values: dict[str, Any]) -> None:
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise ConfigError(f"{self.owner} has no parameter {unknown[0]!r}; parameters: {', '.join(self.params)}")
        for name, p in self.params.items():
            value = values.get(name, p.default)
            if not p.check(value, values):
                raise ConfigError(f"The {name!r} parameter of {self.owner} must be {p.valid}. Got {value!r} instead.")

    def __getitem__(self, name: str) -> Param:
        return self.params[name]

    def __iter__(self):
        return iter(self.params.values())
