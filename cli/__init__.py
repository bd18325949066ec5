"""The `posthoc` command line: parse, call the library, print."""

# Each command module adds its commands to `main` when imported.
from posthoc.cli import check, demo, extract, merge, recipe, split, split_find, stack  # noqa: F401
from posthoc.cli.main import main

__all__ = ["main"]
