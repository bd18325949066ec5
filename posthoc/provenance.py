"""Which posthoc wrote an output, and when: the stamp every output's provenance record starts with."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import metadata

try:
    __version__ = metadata.version("posthoc")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"


def stamp() -> dict[str, str]:
    """{"posthoc_version": …, "created": UTC time to the second}."""
    return {"posthoc_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
