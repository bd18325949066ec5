"""One declared table of parameters per analyser: defaults, valid values, help, type, and the check.

    PARAMS = ParamTable("MoEfier", [
        Param("experts", 16, "an int >= 1", lambda v, p: is_int(v) and v >= 1, "routed experts per FFN", int),
        ...
    ])
    PARAMS.validate(values)  # ConfigError: "The 'top_k' parameter of MoEfier must be an int in
                             #  [1, experts]. Got 0 instead."

The table is the single source of truth: the estimator's defaults, the validation at fit time and the
CLI's options (name, type, default, help) all read it (scikit-learn's `_parameter_constraints`, in one place).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from posthoc.errors import ConfigError


@dataclass(frozen=True)
class Text:
    """How a command-line string becomes a parameter value when that is not plain int, float or str.

    parse raises ValueError with a message for the user; metavar is what the CLI's help shows."""

    metavar: str
    parse: Callable[[str], Any]


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    valid: str  # the valid values, in words, e.g. "an int in [1, experts]"
    check: Callable[[Any, dict[str, Any]], bool]  # (value, all values) -> ok
    help: str
    type: type | Text = str  # what the CLI converts a string to: int, float, str, bool (a --x/--no-x flag), a Text
    choices: tuple[str, ...] | None = None  # for CLI choice options
    cli: bool = True  # False: not a `posthoc split` option (e.g. progress is the commands' own --quiet)


def choice(name: str, default: str, choices: Sequence[str], help: str, *, cli: bool = True) -> Param:
    """A parameter that takes one of a few names (declared once: check, message and CLI choices)."""
    return Param(name, default, f"one of {', '.join(choices)}", lambda v, _: v in choices, help, str, tuple(choices), cli)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ------------------------------------------------------------------------------- command-line types


def _int_list(text: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of FFN indices") from None


def _float_or_auto(text: str) -> float | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid float or 'auto'.") from None


def _directory(text: str) -> str:
    if not os.path.exists(text):
        raise ValueError(f"Directory {text!r} does not exist.")
    if not os.path.isdir(text):
        raise ValueError(f"Directory {text!r} is a file.")
    return text


INT_LIST = Text("TEXT", _int_list)  # "0,1,2" -> [0, 1, 2]; "" -> None
FLOAT_OR_AUTO = Text("FLOAT", _float_or_auto)
DIRECTORY = Text("DIRECTORY", _directory)  # an existing directory


# ------------------------------------------------------------------------------------------- table


class ParamTable:
    def __init__(self, owner: str, params: Sequence[Param]):
        self.owner = owner
        self.params = {p.name: p for p in params}

    def defaults(self) -> dict[str, Any]:
        return {name: p.default for name, p in self.params.items()}

    def check_names(self, names: Sequence[str]) -> None:
        """ConfigError naming the first unknown parameter and listing the valid ones."""
        unknown = sorted(set(names) - set(self.params))
        if unknown:
            raise ConfigError(f"{self.owner} has no parameter {unknown[0]!r}; parameters: {', '.join(self.params)}")

    def validate(self, values: dict[str, Any]) -> None:
        self.check_names(list(values))
        for name, p in self.params.items():
            value = values.get(name, p.default)
            if not p.check(value, values):
                raise ConfigError(f"The {name!r} parameter of {self.owner} must be {p.valid}. Got {value!r} instead.")

    def __getitem__(self, name: str) -> Param:
        return self.params[name]

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params.values())
