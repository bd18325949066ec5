"""The `posthoc` command group. Commands parse options, make one library call and print the result."""

from __future__ import annotations

import functools
import importlib
import logging
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import yaml

from posthoc.errors import PosthocError
from posthoc.provenance import __version__

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(fn: F) -> F:
    """Turn the library's typed errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PosthocError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


_SIZE = re.compile(r"^\s*([0-9.eE+-]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")

def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '5e9', or mergekit's '5B' (billions of bytes) -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit == "b":
        return int(number * 10**9)
    base = 1024 if "i" in unit else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[:1]]
    return int(number * base**power)


def parse_assignment(text: str, *, as_text: bool = False) -> tuple[str, Any]:
    """`KEY=VALUE` from a command line, as (key, value) without the spaces around either.

    The value is read as a YAML scalar or list (`3`, `0.5`, `true`, `[de, fr]`; text that is not valid YAML
    stays text, an empty value is ""), or kept as text with `as_text`. ValueError when there is no '='."""
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    if as_text:
        return key.strip(), raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


class KeyValue(click.ParamType):
    """A `KEY=VALUE` option (`merge --set`, `extract --tag`, `recipe run --set`), converted to (key, value) by
    `parse_assignment`; a repeatable one gives a tuple of pairs, which `dict()` turns into the settings."""

    name = "KEY=VALUE"

    def __init__(self, *, as_text: bool = False, example: str | None = None):
        self.as_text, self.example = as_text, example

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, Any]:
        if isinstance(value, tuple):  # converted already
            return value
        try:
            return parse_assignment(str(value), as_text=self.as_text)
        except ValueError:
            example = f" (e.g. {self.example})" if self.example else ""
            self.fail(f"expected KEY=VALUE{example}, got {value!r}", param, ctx)


# command -> the modules of posthoc.cli that define it (and its subcommands)
COMMAND_MODULES = {
    "check": ("check",),
    "demo": ("demo",),
    "extract": ("extract",),
    "merge": ("merge",),
    "recipe": ("recipe",),
    "split": ("split",),
    "stack": ("stack",),
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs, so `posthoc merge` does not pay for the
    analysers' and recipes' imports (~0.3 s of start-up)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for module in COMMAND_MODULES.get(cmd_name, ()):
            importlib.import_module(f".{module}", __package__)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="posthoc")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (to stderr).")
def main(verbose: bool) -> None:
    """posthoc: post-hoc modular deep learning.

    Find modules inside trained dense transformers (split), turn fine-tunes into portable modules
    (extract), and compose, average or task-arithmetic checkpoints and modules (merge, stack).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
