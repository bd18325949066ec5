"""The `posthoc` command line: parse, call the library, print."""

from posthoc.cli import check, demo, merge  # noqa: E402,F401  (each module adds its commands to `main`)
from posthoc.cli.main import main

__all__ = ["main"]
