"""The `posthoc` command line: parse, call the library, print.

Each command lives in its own module, imported when the command runs (see `main.LazyGroup`)."""

from .main import main

__all__ = ["main"]
